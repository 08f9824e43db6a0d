"""Cancel, consent and follow-up questions reach the case workflow on a real Temporal dev server.

The workflow here is a stand-in registered as `CaseWorkflow` that accepts the same update and signal names
as the real one, ends when cancelled and refuses a fourth question, so the
test checks intake's side of the contract: what it sends, and how a refusal reaches the partner.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from contracts.decisions import CancelCase, ConsentReceived, FollowUpQuestion
    from contracts.models import CaseInput

from contracts import DeliverReport, new_event
from services.auth.models import AuditEvent
from services.common.config import Settings
from services.common.db import Inbox
from services.intake import api, consumer, handlers
from services.intake.models import Case, CaseCreate, CaseDocument
from tests.conftest import STAND_IN_QUEUE
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner


# Unsandboxed: this test module imports the web stack, which the sandbox would re-import per run.
@workflow.defn(name="CaseWorkflow", sandboxed=False)
class StandInCaseWorkflow:
    def __init__(self) -> None:
        self.consent_documents: list[str] = []
        self.questions: list[str] = []
        self.cancelled_by: str | None = None
        self.consent_on_file = True

    @workflow.run
    async def run(self, case: CaseInput) -> None:
        self.consent_on_file = case.consent_on_file
        await workflow.wait_condition(lambda: self.cancelled_by is not None)

    @workflow.update
    def cancel(self, decision: CancelCase) -> None:
        self.cancelled_by = decision.by

    @workflow.update
    def ask_question(self, question: FollowUpQuestion) -> None:
        self.questions.append(question.question_id)

    @ask_question.validator
    def _question_allowed(self, question: FollowUpQuestion) -> None:
        if len(self.questions) >= 3:
            raise ValueError("at most three follow-up questions per case")

    @workflow.signal
    def consent_received(self, consent: ConsentReceived) -> None:
        self.consent_documents.append(consent.document_id)

    @workflow.query
    def received(self) -> dict[str, object]:
        return {
            "consent_on_file": self.consent_on_file,
            "consent_documents": self.consent_documents,
            "questions": self.questions,
            "cancelled_by": self.cancelled_by,
        }


RELEASE = {  # a signed records release: puts consent on file
    "kind": "records_release_authorization",
    "title": "Signed release",
    "content_type": "application/pdf",
    "content_base64": base64.b64encode(b"%PDF-1.4").decode(),
}


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture
async def http(
    temporal_env,
    engines: tuple[Engine, Engine],
    settings: Settings,  # type: ignore[no-untyped-def]
) -> AsyncIterator[tuple[httpx.AsyncClient, Client]]:
    _, auth = engines
    queue = f"{STAND_IN_QUEUE}{uuid.uuid4().hex[:8]}"
    app = intake_app(engines, api.router, temporal=temporal_env.client)
    app.dependency_overrides[api.settings_dep] = lambda: settings.model_copy(
        update={"temporal_task_queue": queue}
    )
    partner = new_partner(auth, "Decider")
    async with (
        Worker(temporal_env.client, task_queue=queue, workflows=[StandInCaseWorkflow]),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://intake",
            headers={"Authorization": partner["Authorization"]},
            timeout=30,
        ) as client,
    ):
        yield client, temporal_env.client


async def received(client: Client, case_id: str) -> dict:
    return await client.get_workflow_handle(f"case-{case_id}").query("received", result_type=dict)  # type: ignore[no-any-return]


async def test_consent_cancel_and_questions_reach_the_workflow_and_refusals_are_409(
    http: tuple[httpx.AsyncClient, Client], engines: tuple[Engine, Engine]
) -> None:
    client, temporal = http
    created = await client.post("/v1/cases", json=dict(SAMPLE, consent_on_file=False))
    assert created.status_code == 201, created.text
    case_id = created.json()["case_id"]
    assert (await received(temporal, case_id))["consent_on_file"] is False

    document = (await client.post(f"/v1/cases/{case_id}/documents", json=RELEASE)).json()
    assert (await received(temporal, case_id))["consent_documents"] == [document["document_id"]]

    deliver = new_event(
        id=f"wf:{case_id}:deliver", source="/workflows/case", subject=case_id,
        data=DeliverReport(case_id=case_id, report_id="rp1", pdf_url="http://r/pdf", fhir_url="http://r/fhir"),
    )  # fmt: skip
    with Session(engines[0]) as session:
        consumer.handle(session, deliver)
        session.add(Inbox(message_id=deliver.id, queue="intake", message_type=deliver.type))
        session.commit()
    asked = [
        await client.post(f"/v1/cases/{case_id}/questions", json={"text": f"Question {n}?"}) for n in range(3)
    ]
    assert [a.status_code for a in asked] == [201, 201, 201]
    assert (await received(temporal, case_id))["questions"] == [a.json()["question_id"] for a in asked]
    fourth = await client.post(f"/v1/cases/{case_id}/questions", json={"text": "One more?"})
    assert fourth.status_code == 409
    assert "at most three" in fourth.json()["detail"]

    cancelled = await client.post(f"/v1/cases/{case_id}/cancel", json={"reason": "patient withdrew"})
    assert cancelled.status_code == 200, cancelled.text
    assert str((await received(temporal, case_id))["cancelled_by"]).startswith("key:")
    again = await client.post(f"/v1/cases/{case_id}/cancel", json={"reason": "patient withdrew"})
    assert again.status_code == 409
    assert "ended (completed)" in again.json()["detail"]


async def test_cancel_before_the_workflow_started_is_503_and_an_unknown_case_404(
    http: tuple[httpx.AsyncClient, Client], engines: tuple[Engine, Engine]
) -> None:
    client, _ = http
    mine = (await client.post("/v1/cases", json=SAMPLE)).json()
    with Session(engines[0], expire_on_commit=False) as session:
        stored = handlers.new_case(
            CaseCreate.model_validate(SAMPLE), mine["partner_id"], session
        )  # as if Temporal had been down at creation
        session.commit()
    waiting = await client.post(f"/v1/cases/{stored.id}/cancel", json={"reason": "patient withdrew"})
    assert waiting.status_code == 503
    assert "retry" in waiting.json()["detail"]
    missing = await client.post(f"/v1/cases/{uuid.uuid4()}/cancel", json={"reason": "whatever"})
    assert missing.status_code == 404


async def flagged_started(intake: Engine, case_ids: set[str], within: float = 10) -> set[str]:
    """Which of `case_ids` carry the started flag, once all do or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        with Session(intake) as session:
            flagged = set(
                session.exec(select(Case.id).where(col(Case.id).in_(case_ids), Case.workflow_started))
            )
        if flagged == case_ids or time.monotonic() > deadline:
            return flagged
        await asyncio.sleep(0.05)


async def test_started_cases_are_flagged_in_the_background_and_each_creation_is_audited(
    http: tuple[httpx.AsyncClient, Client], engines: tuple[Engine, Engine]
) -> None:
    """The POST answers once Temporal has the workflow; the flag that spares the reconciler a second start
    is set after the answer, for a burst's cases together, and the audit entry is written beside the start."""
    client, temporal = http
    intake, auth = engines
    answers = await asyncio.gather(*(client.post("/v1/cases", json=SAMPLE) for _ in range(12)))
    assert [a.status_code for a in answers] == [201] * 12, [a.text for a in answers if a.status_code != 201]
    case_ids = {a.json()["case_id"] for a in answers}
    for case_id in case_ids:  # started before the answer
        description = await temporal.get_workflow_handle(f"case-{case_id}").describe()
        assert description.status == WorkflowExecutionStatus.RUNNING

    flagged = await flagged_started(intake, case_ids)
    assert flagged == case_ids, f"{len(case_ids - flagged)} of 12 started cases never flagged"
    assert not case_ids & {c.id for c in api.unstarted_cases(intake, limit=10_000, settled_for=timedelta(0))}
    with Session(auth) as session:
        audited = session.exec(
            select(AuditEvent.case_id).where(
                col(AuditEvent.case_id).in_(case_ids), AuditEvent.action == "create"
            )
        ).all()
    assert sorted(audited, key=str) == sorted(case_ids)


async def test_consent_sent_before_the_started_flag_is_set_still_reaches_the_workflow(
    http: tuple[httpx.AsyncClient, Client], engines: tuple[Engine, Engine]
) -> None:
    """The flag is set just after the POST answers, so a partner that sends the signed release at once can
    find it unset: the workflow, which exists, is told anyway, and the document is not left to the
    reconciler."""
    client, temporal = http
    intake, _ = engines
    case_id = (await client.post("/v1/cases", json=dict(SAMPLE, consent_on_file=False))).json()["case_id"]
    assert await flagged_started(intake, {case_id}) == {case_id}
    with intake.begin() as conn:  # as if the release arrived before the background writer got to it
        conn.execute(update(Case).where(col(Case.id) == case_id).values(workflow_started=False))

    document = (await client.post(f"/v1/cases/{case_id}/documents", json=RELEASE)).json()
    assert (await received(temporal, case_id))["consent_documents"] == [document["document_id"]]
    with Session(intake) as session:
        stored = session.get(CaseDocument, document["document_id"])
        assert stored is not None and stored.consent_signalled_at is not None  # nothing left to signal later


@pytest.mark.parametrize("decision", ["cancel", "questions"])
async def test_a_decision_waiting_on_the_database_leaves_the_event_loop_free(
    http: tuple[httpx.AsyncClient, Client], engines: tuple[Engine, Engine], decision: str
) -> None:
    """Cancel and questions read and write the database off the event loop: while the cases table is locked,
    the decision waits for it and the loop goes on serving (on the loop, it would stall for the whole wait)."""
    client, _ = http
    case_id = (await client.post("/v1/cases", json=SAMPLE)).json()["case_id"]
    body = {"reason": "patient withdrew"} if decision == "cancel" else {"text": "Is an MRI needed?"}
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            gaps.append(time.monotonic() - last - 0.05)
            last = time.monotonic()

    locker = engines[0].connect()
    locker.begin()
    locker.exec_driver_sql("LOCK TABLE cases IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(3, locker.rollback)  # from a thread: a stalled loop could not release it
    beating = asyncio.create_task(heartbeat())
    try:
        release.start()
        started = time.monotonic()
        done = await client.post(f"/v1/cases/{case_id}/{decision}", json=body)
        waited = time.monotonic() - started
    finally:
        beating.cancel()
        release.join()
        locker.close()
    assert waited > 2, f"the {decision} did not wait for the locked table ({waited:.1f} s): nothing was shown"
    assert max(gaps) < 1, f"the event loop stalled {max(gaps):.1f} s while the {decision} waited"
    assert (await client.get("/healthz")).status_code == 200
    # cancel goes through; a question before delivery is refused: an answer either way once the lock went
    assert done.status_code == (200 if decision == "cancel" else 409), done.text
