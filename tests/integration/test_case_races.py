"""Decisions racing on a real case workflow through intake's API (the worker and broker of
test_case_workflow): the workflow takes one, and each other caller is told what happened."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client

from services.common.config import Settings
from services.intake import api, handlers
from services.intake.models import Case, CaseCreate, CaseTimelineEntry
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_case_workflow import client, start, to_review  # noqa: F401
from tests.integration.test_intake_api import SAMPLE, new_partner


def intake_row(engine: Engine, case_id: str, partner_id: str) -> None:
    """Intake's row for the case whose workflow the test started."""
    request = CaseCreate.model_validate(SAMPLE | {"partner_case_ref": case_id})
    with Session(engine) as session:
        case = handlers.new_case(request, partner_id, session)
        for row in session.new:
            if isinstance(row, Case):
                row.id = case_id
            elif isinstance(row, CaseTimelineEntry):
                row.case_id, row.event_id = case_id, f"intake:{case_id}"
        assert case.id == case_id
        session.commit()


async def test_cancels_sent_at_once_cancel_once_and_the_others_are_told_what_happened(
    client: Client,  # noqa: F811
    settings: Settings,
) -> None:
    intake, auth = intake_engines(settings)
    partner = new_partner(auth, "Double Canceller")
    handle, services = await start(client, settings)
    intake_row(intake, services.case_id, partner["partner_id"])
    await to_review(handle, services)
    app = intake_app((intake, auth), api.router, temporal=client)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": partner["Authorization"]}
    async with httpx.AsyncClient(transport=transport, base_url="http://intake", headers=headers) as http:
        path = f"/v1/cases/{services.case_id}/cancel"
        answers = await asyncio.gather(
            *[http.post(path, json={"reason": f"patient withdrew ({i})"}, timeout=30) for i in range(4)]
        )
    await services.expect("case.cancelled")
    services.close()

    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409], [a.text for a in answers]
    for refused in (a for a in answers if a.status_code == 409):
        detail = refused.json()["detail"]
        assert detail.startswith("the case cannot be cancelled: "), detail
        # Refused by the workflow while it cancels, or told it has just ended, and where to look.
        assert "is being cancelled" in detail or f"GET /v1/cases/{services.case_id}" in detail, detail
