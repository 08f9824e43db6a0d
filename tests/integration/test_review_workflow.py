"""Offers through the real case workflow: Temporal dev server, worker, event bridge, the review service's
consumer and outbox relay on the real broker and database. The test plays records and insurance, the patient
accepting the cost, and the specialist using the review API."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowHandle

from contracts import (
    CaseInput,
    CaseStatus,
    Coverage,
    CoverageStatus,
    Exam,
    InsuranceVerified,
    OriginalReport,
    Patient,
    RecordsAssembled,
    ReferringPhysician,
    ReportDelivered,
    StudySummary,
    Urgency,
    new_event,
)
from contracts.decisions import CloseCase, CostChoice, CostDecision, DocumentCommunication
from contracts.models import DirectCommunication
from services.common.amqp import EVENTS, Consumer, OutboxRelay, Publisher, ensure_topology
from services.common.config import Settings
from services.common.db import Outbox
from services.review import consumer
from services.review.models import Review
from tests.infra import purge_queues
from tests.integration import test_review_flow as flow
from tests.keys import specialist_headers
from workflows.bridge import EventBridge
from workflows.case import CaseWorkflow
from workflows.worker import build_worker

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables
# The flow's findings are a major discrepancy; these also say who was told, so the case does not wait for it.
FINDINGS_TOLD = flow.FINDINGS | {
    "communication": {
        "recipient": "Dr A",
        "method": "telephone",
        "at": "2026-11-02T10:00:00Z",
        "read_back": True,
    }
}


@pytest.fixture(scope="module")
def review_service(settings: Settings, engine: Engine) -> Iterator[None]:
    ensure_topology(settings)
    # Other modules' workflows leave commands in this session's vhost: start from an empty queue.
    purge_queues(settings.amqp_url, "review", "workflows.bridge")
    relay = OutboxRelay(settings=settings, engine=engine, interval=0.1)
    review = Consumer(
        settings=settings,
        queue="review",
        engine=engine,
        handle=partial(consumer.handle, settings=settings),
        on_commit=relay.wake,
    )
    threads = [threading.Thread(target=part.run_forever, daemon=True) for part in (relay, review)]
    for thread in threads:
        thread.start()
    assert review.connected.wait(10)
    yield
    review.stop()
    relay.stop()
    for thread in threads:
        thread.join(timeout=5)


@pytest.fixture(scope="module")
async def temporal(temporal_env, settings: Settings, review_service: None) -> AsyncIterator[Client]:  # type: ignore[no-untyped-def]
    temporal_client: Client = temporal_env.client
    bridge = EventBridge(settings=settings, client=temporal_client, loop=asyncio.get_running_loop())
    thread = threading.Thread(target=bridge.run_forever, daemon=True)
    thread.start()
    with ThreadPoolExecutor(8) as executor:
        async with build_worker(temporal_client, settings, executor):
            yield temporal_client
    bridge.stop()
    thread.join(5)


def case_input(case_id: str) -> CaseInput:
    return CaseInput(
        case_id=case_id,
        partner_id="partner-a",
        urgency=Urgency.PRIORITY,
        subspecialty_hint="gynecologic_imaging",
        due_at=datetime.now(UTC) + timedelta(days=4),
        patient=Patient(
            family_name="Canary",
            given_name="Zed",
            birth_date=date(1980, 1, 2),
            sex="female",
            mrn="M1",
            state="CA",
        ),
        referring=ReferringPhysician(name="Dr A", npi="1234567893", organization="Clinic"),
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 1), facility="Imaging"),
        clinical_question="adnexal mass?",
        reason="possible_malignancy",
        coverage=Coverage(plan_code="ACME-PPO", member_id="W1"),
    )


def send(settings: Settings, case_id: str, data: Any) -> None:
    publisher = Publisher(settings)
    try:
        publisher.publish(EVENTS, new_event(id=str(uuid.uuid4()), source="/test", subject=case_id, data=data))
    finally:
        publisher.close()


async def until(predicate: Any, what: str, timeout: float = 20) -> Any:
    for _ in range(int(timeout * 10)):
        value = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def reviews_of(engine: Engine, case_id: str) -> list[Review]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(Review).where(Review.case_id == case_id).order_by(col(Review.assigned_at))
            ).all()
        )


async def to_matching(temporal: Client, settings: Settings) -> tuple[WorkflowHandle, str]:
    case_id = str(uuid.uuid4())
    handle = await temporal.start_workflow(
        CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue="cases"
    )
    send(
        settings,
        case_id,
        InsuranceVerified(
            case_id=case_id,
            coverage_status=CoverageStatus.COVERED,
            plan_code="ACME-PPO",
            cpt="76140",
            allowed_amount=Decimal("300.00"),
            patient_cost=Decimal("0"),
            explanation="covered in full",
        ),
    )
    send(
        settings,
        case_id,
        RecordsAssembled(
            case_id=case_id,
            report=OriginalReport(content_type="text/plain", sha256="ab" * 32, text="Complex cyst."),
            study=StudySummary(
                study_instance_uid="1.2.3",
                modality="US",
                instance_count=2,
                multiframe_count=0,
                series_count=1,
            ),
            file_count=3,
        ),
    )

    async def status() -> CaseStatus:
        return await handle.query(CaseWorkflow.status)  # type: ignore[no-any-return]

    async def waiting_or_offered() -> bool:
        s = await status()
        if s == CaseStatus.AWAITING_PATIENT_DECISION:
            await handle.execute_update(
                CaseWorkflow.decide_cost, CostDecision(choice=CostChoice.ACCEPT, by="patient-portal")
            )
        return s == CaseStatus.AWAITING_ACCEPTANCE

    await until(waiting_or_offered, "the first offer")
    return handle, case_id


async def test_decline_and_expiry_rematch_through_the_workflow(
    temporal: Client, settings: Settings, engine: Engine, client: TestClient, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, case_id = await to_matching(temporal, settings)
    [first] = reviews_of(engine, case_id)
    assert (first.reviewer_id, first.status) == ("spec-gyn-1", "offered")

    declined = client.post(f"/v1/reviews/{first.id}/decline", json={"reason": "on leave this week"})
    assert declined.status_code == 200
    second = await until(
        lambda: [r for r in reviews_of(engine, case_id) if r.id != first.id],
        "a second offer after the decline",
    )
    assert second[0].reviewer_id != "spec-gyn-1"  # the workflow excluded who declined

    # A fast-forward is one-shot: the offer's 24 h clock must be running before it, and the row above is
    # written before the workflow has even heard of the offer (under load, long before).
    async def awaiting_second_acceptance() -> bool:
        review = await handle.query(CaseWorkflow.review)
        status = await handle.query(CaseWorkflow.status)
        return (
            status == CaseStatus.AWAITING_ACCEPTANCE
            and review is not None
            and review.review_id == second[0].id
        )

    await until(awaiting_second_acceptance, "the workflow awaiting the second offer's acceptance")
    await temporal_env.fast_forward(handle, timedelta(hours=25))
    withdrawn = await until(
        lambda: [r for r in reviews_of(engine, case_id) if r.id == second[0].id and r.status == "withdrawn"],
        "the expired offer withdrawn",
    )
    late = client.post(f"/v1/reviews/{second[0].id}/accept")
    await handle.terminate("test done")

    assert withdrawn[0].withdrawn_reason == "expired"
    assert late.status_code == 409
    assert "the offer expired at" in late.json()["detail"]
    worklist = client.get("/v1/reviews", params={"reviewer": second[0].reviewer_id}).json()
    assert second[0].id not in [i["review_id"] for i in worklist]


async def test_the_specialists_own_addendum_reaches_the_referring_physician_through_the_workflow(
    temporal: Client, settings: Settings, engine: Engine, client: TestClient
) -> None:
    handle, case_id = await to_matching(temporal, settings)
    [review] = reviews_of(engine, case_id)
    signed = specialist_headers(settings, review.reviewer_id)
    assert client.post(f"/v1/reviews/{review.id}/accept").status_code == 200

    async def status_is(status: CaseStatus) -> bool:
        return await handle.query(CaseWorkflow.status) == status  # type: ignore[no-any-return]

    async def delivered(n: int) -> None:
        """Play intake: once the workflow has sent the n-th report.deliver, the physician has the report."""
        await until(partial(deliveries, handle, n), f"delivery {n} requested")
        report = client.get(f"/v1/reports/{case_id}").json()
        send(
            settings,
            case_id,
            ReportDelivered(
                case_id=case_id,
                report_id=report["id"],
                recipient="NPI 1234567893",
                delivered_at=datetime.now(UTC),
            ),
        )
        await until(partial(deliveries_done, handle, n), f"delivery {n} done")

    await until(partial(status_is, CaseStatus.IN_REVIEW), "the review accepted")
    submitted = client.post(f"/v1/reviews/{review.id}", json=FINDINGS_TOLD, headers=signed)
    assert submitted.status_code == 200, submitted.text
    await delivered(1)
    correction = {"kind": "additional_finding", "text": "Small amount of free fluid in the pouch of Douglas."}
    added = client.post(f"/v1/reviews/{review.id}/addenda", json=correction, headers=signed)
    assert added.status_code == 201, added.text
    await delivered(2)
    await handle.execute_update(CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
    await handle.result()
    await until(
        lambda: reviews_of(engine, case_id)[0].case_closed_at is not None, "the review told of the close"
    )
    with Session(engine) as session:  # the one addendum was delivered: no alert that one was not
        undelivered = col(Outbox.message_id).startswith(f"case.alert:{case_id}:undelivered:")
        assert session.exec(select(Outbox).where(undelivered)).all() == []
    late = {"kind": "correction", "text": "The free fluid is a small amount, not moderate."}
    too_late = client.post(f"/v1/reviews/{review.id}/addenda", json=late, headers=signed)

    timeline = [t.detail for t in await handle.query(CaseWorkflow.timeline)]
    assert "the specialist's own addendum delivered (report version 2)" in timeline
    assert client.get(f"/v1/reports/{case_id}").json()["status"] == "appended"
    assert too_late.status_code == 409 and "closed at" in too_late.json()["detail"]


async def test_an_untold_major_discrepancy_is_reported_with_the_communication_operations_documented(
    temporal: Client, settings: Settings, engine: Engine, client: TestClient
) -> None:
    handle, case_id = await to_matching(temporal, settings)
    [review] = reviews_of(engine, case_id)
    assert client.post(f"/v1/reviews/{review.id}/accept").status_code == 200

    async def status_is(status: CaseStatus) -> bool:
        return await handle.query(CaseWorkflow.status) == status  # type: ignore[no-any-return]

    await until(partial(status_is, CaseStatus.IN_REVIEW), "the review accepted")
    signed = specialist_headers(settings, review.reviewer_id)
    submitted = client.post(f"/v1/reviews/{review.id}", json=flow.FINDINGS, headers=signed)
    assert submitted.status_code == 200, submitted.text
    await until(
        partial(status_is, CaseStatus.AWAITING_COMMUNICATION), "the case waiting for the communication"
    )
    await asyncio.sleep(1)
    assert client.get(f"/v1/reports/{case_id}").status_code == 404  # no report composed meanwhile

    told_at = datetime.now(UTC)
    documented = DocumentCommunication(
        by="nurse-12",
        communication=DirectCommunication(
            recipient="Dr. Alex Kim", recipient_role="referring physician", method="telephone", at=told_at
        ),
    )
    await handle.execute_update(CaseWorkflow.document_communication, documented)
    await until(partial(deliveries, handle, 1), "delivery requested")
    report = client.get(f"/v1/reports/{case_id}").json()
    send(
        settings,
        case_id,
        ReportDelivered(
            case_id=case_id,
            report_id=report["id"],
            recipient="NPI 1234567893",
            delivered_at=datetime.now(UTC),
        ),
    )
    await until(partial(deliveries_done, handle, 1), "the report delivered")
    await handle.terminate("test done")

    said = (
        f"Major discrepancy communicated by telephone to Dr. Alex Kim (referring physician) at "
        f"{told_at:%Y-%m-%d %H:%M} UTC; documented by nurse-12 at "
    )
    assert said in report["conclusion"]
    pdf = client.get(f"/v1/reports/{case_id}/pdf")
    assert said in flow.pdf_text(pdf.content)


async def deliveries(handle: WorkflowHandle, n: int) -> bool:
    timeline = await handle.query(CaseWorkflow.timeline)
    return sum(t.status == CaseStatus.DELIVERING and t.kind == "transition" for t in timeline) >= n


async def deliveries_done(handle: WorkflowHandle, n: int) -> bool:
    timeline = await handle.query(CaseWorkflow.timeline)
    done = sum(t.status == CaseStatus.DELIVERED and t.kind == "transition" for t in timeline) >= n
    return done and await handle.query(CaseWorkflow.status) == CaseStatus.FOLLOW_UP
