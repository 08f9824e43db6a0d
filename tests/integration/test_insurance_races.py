"""Coverage work racing the case's cancellation on the real PostgreSQL: the request is paused once it has
read the case's verification, so the race runs the same way every time."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from contracts import Coverage, new_event
from contracts.events import CaseCancelled
from services.insurance import handlers
from tests.integration.test_insurance_api import apply, client, engine, events, verified_case  # noqa: F401


def test_an_authorization_racing_the_cancellation_is_refused_and_not_announced(
    engine: Engine,  # noqa: F811
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-GATED", member_id="G1"))
    read, go = threading.Event(), threading.Event()
    young = handlers._young

    def paused(*args: Any, **kwargs: Any) -> bool:
        read.set()  # the verification is read and found open; the authorization is being checked
        assert go.wait(10)
        return young(*args, **kwargs)

    monkeypatch.setattr(handlers, "_young", paused)
    answers: list[Any] = []
    body = {"authorization_number": "PA-9", "by": "staff-3"}
    authorizing = threading.Thread(
        target=lambda: answers.append(client.post(f"/v1/coverage/{case_id}/authorization", json=body))
    )
    authorizing.start()
    assert read.wait(10)
    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="staff-1")
    apply(engine, new_event(id=f"case-{case_id}:cancelled", source="/test", data=cancelled, subject=case_id))
    go.set()
    authorizing.join(10)

    assert answers[0].status_code == 409, answers[0].text
    assert "was cancelled" in answers[0].json()["detail"]
    assert [e.type for e in events(engine, case_id)] == ["insurance.verified"]
