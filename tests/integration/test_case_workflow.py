"""The case workflow on a real Temporal dev server (per-workflow time skipping), wired through the real
broker by its activities and the event bridge. The test plays the services: it reads the commands the
workflow publishes and answers with events, and it plays operations staff sending decisions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import pytest
import uvicorn
from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, UpdateWorkflowExecutionLifecycleStage
from temporalio.api.update.v1 import UpdateRef, WaitPolicy
from temporalio.api.workflowservice.v1 import PollWorkflowExecutionUpdateRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import UnfinishedUpdateHandlersWarning

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
    ReportReady,
    ReviewSubmitted,
    StudySummary,
    Urgency,
    new_event,
)
from contracts.decisions import (
    CancelCase,
    CloseCase,
    ConsentReceived,
    CostChoice,
    CostDecision,
    DocumentCommunication,
    FollowUpQuestion,
    HoldCase,
    IdentityChoice,
    IdentityDecision,
    ReassignReviewer,
    ResumeCase,
)
from contracts.envelope import CloudEvent
from contracts.events import (
    IdentityMismatch,
    QuestionAnswered,
    RecordsIncomplete,
    ReportAddended,
    ReviewAccepted,
    ReviewDeclined,
    ReviewOffered,
    ReviewUnmatched,
)
from contracts.models import DirectCommunication
from services.common.amqp import COMMANDS, EVENTS, Consumer, Publisher, ensure_topology
from services.common.codec_server import create_codec_app
from services.common.config import Settings
from services.common.temporal import ASSIGNED_REVIEWER, CASE_DUE_AT, CASE_STATUS, CASE_URGENCY, PARTNER_ID
from services.intake import consumer as intake_consumer
from tests.conftest import temporal_binary
from tests.infra import free_port
from tests.integration.intake_app import intake_engines
from tests.integration.test_intake_races import a_case, mirrored_status
from tests.replay.markers import patches_by_task
from workflows.activities import CaseActivities
from workflows.bridge import EventBridge
from workflows.case import ASKED_AT_START, CaseWorkflow
from workflows.models import PublishEvent
from workflows.worker import build_worker, workflow_runner

TASK_QUEUE = "cases"
HISTORIES = Path(__file__).resolve().parents[1] / "replay" / "histories"


async def keep_history(handle: WorkflowHandle, name: str) -> None:
    """Check that the case asked its patches in its first workflow task only (a patch asked later can be answered
    wrongly on replay: see PATCHES_AT_START); with RECORD_HISTORIES=1 (make replay-record), store its history for
    the replay test."""
    history = await handle.fetch_history()
    assert patches_by_task(history) == [(1, patch) for patch in ASKED_AT_START], name
    if os.environ.get("RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(parents=True, exist_ok=True)
        (HISTORIES / f"{name}.json").write_text(history.to_json())


@pytest.fixture(scope="module")
async def client(temporal_env, settings: Settings) -> AsyncIterator[Client]:  # type: ignore[no-untyped-def]
    ensure_topology(settings)
    client: Client = temporal_env.client
    bridge = EventBridge(settings=settings, client=client, loop=asyncio.get_running_loop())
    thread = threading.Thread(target=bridge.run_forever, daemon=True)
    thread.start()
    with ThreadPoolExecutor(8) as executor:
        async with build_worker(client, settings, executor):
            yield client
    bridge.stop()
    thread.join(5)


def test_the_suites_worker_runs_the_workflow_in_the_sandbox(settings: Settings) -> None:
    """So that a non-deterministic call in workflow code fails these tests (production runs without it)."""
    assert isinstance(workflow_runner(settings), SandboxedWorkflowRunner)


class Services:
    """Sees every command and workflow event for one case, and answers as the services would."""

    def __init__(self, settings: Settings, case_id: str) -> None:
        self.settings = settings
        self.case_id = case_id
        self.conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        self.channel = self.conn.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, COMMANDS, routing_key="#")
        self.channel.queue_bind(self.queue, EVENTS, routing_key="case.*")
        self.seen: list[dict[str, Any]] = []
        self.publisher = Publisher(settings)

    def close(self) -> None:
        self.publisher.close()
        self.conn.close()

    async def expect(self, type_: str, timeout: float = 20, **data: Any) -> dict[str, Any]:
        """The next message of `type_` for this case (whose data contains `data`), seen or still to come."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for message in self.seen:
                if message["type"] == type_ and all(message["data"].get(k) == v for k, v in data.items()):
                    self.seen.remove(message)
                    return message
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"no {type_} {data} within {timeout}s; saw {[m['type'] for m in self.seen]}"
                )
            method, _, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                await asyncio.sleep(0.05)
                continue
            message = json.loads(body)
            if message["subject"] == self.case_id:
                self.seen.append(message)

    def types(self) -> list[str]:
        return [m["type"] for m in self.seen]

    def send(self, data: Any, event_id: str | None = None) -> None:
        event = new_event(id=event_id or str(uuid.uuid4()), source="/test", subject=self.case_id, data=data)
        self.publisher.publish(EVENTS, event)

    # What each service answers -----------------------------------------------------------------

    def records_assembled(self, event_id: str | None = None) -> None:
        self.send(
            RecordsAssembled(
                case_id=self.case_id,
                report=OriginalReport(content_type="text/plain", sha256="ab" * 32, text="complex cyst"),
                study=StudySummary(
                    study_instance_uid="1.2.3",
                    modality="US",
                    instance_count=2,
                    multiframe_count=1,
                    series_count=1,
                ),
                file_count=3,
            ),
            event_id,
        )

    def insurance_verified(self, patient_cost: str = "85.00", authorization: str = "no-auth") -> None:
        self.send(
            InsuranceVerified(
                case_id=self.case_id,
                coverage_status=CoverageStatus.COVERED,
                plan_code="ACME-PPO",
                cpt="76140",
                allowed_amount=Decimal("300.00"),
                patient_cost=Decimal(patient_cost),
                explanation="copay and coinsurance",
                authorization=authorization,
            )
        )

    def offered(self, review_id: str, reviewer: str) -> None:
        self.send(
            ReviewOffered(
                case_id=self.case_id,
                review_id=review_id,
                reviewer_id=reviewer,
                subspecialty="gynecologic_imaging",
                explanation="licensed in CA",
            )
        )


def case_input(case_id: str, **overrides: Any) -> CaseInput:
    fields: dict[str, Any] = {
        "case_id": case_id,
        "partner_id": "partner-a",
        "urgency": Urgency.PRIORITY,
        "subspecialty_hint": "gynecologic_imaging",
        "due_at": datetime.now(UTC) + timedelta(days=2),
        "patient": Patient(
            family_name="Canary",
            given_name="Zed",
            birth_date=date(1980, 1, 2),
            sex="female",
            mrn="M1",
            state="CA",
        ),
        "referring": ReferringPhysician(name="Dr A", npi="1234567893", organization="Clinic"),
        "exam": Exam(exam_type="pelvic", performed_on=date(2026, 11, 1), facility="Imaging"),
        "clinical_question": "adnexal mass?",
        "reason": "possible_malignancy",
        "coverage": Coverage(plan_code="ACME-PPO", member_id="W1"),
    }
    fields.update(overrides)
    return CaseInput(**fields)


async def start(
    client: Client,
    settings: Settings,
    task_queue: str = TASK_QUEUE,
    case_id: str | None = None,
    **overrides: Any,
) -> tuple[WorkflowHandle, Services]:
    case_id = case_id or str(uuid.uuid4())
    services = Services(settings, case_id)
    case = case_input(case_id, **overrides)
    handle = await client.start_workflow(
        CaseWorkflow.run,
        case,
        id=f"case-{case_id}",
        task_queue=task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(CASE_STATUS, "intake"),
                SearchAttributePair(CASE_URGENCY, case.urgency.value),
                SearchAttributePair(PARTNER_ID, "partner-a"),
                SearchAttributePair(CASE_DUE_AT, case.due_at),
            ]
        ),
    )
    return handle, services


async def decide(handle: WorkflowHandle, update: Any, argument: Any) -> Any:
    """Send a decision; retried only while the server reports the workflow task not ready (a transient
    state under load). A validator's rejection is a WorkflowUpdateFailedError and is never retried."""
    for attempt in range(10):
        try:
            return await handle.execute_update(update, argument)
        except RPCError as exc:
            if "workflow task failure" not in str(exc) or attempt == 9:
                raise
            await asyncio.sleep(0.5)


async def current_details(handle: WorkflowHandle) -> str:
    """What the Temporal UI shows as the case's current details."""
    metadata = await handle.query("__temporal_workflow_metadata")
    return str(metadata.current_details)


async def wait_status(handle: WorkflowHandle, status: CaseStatus, timeout: float = 20) -> None:
    for _ in range(int(timeout * 20)):
        if await handle.query(CaseWorkflow.status) == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"case never reached {status}; it is {await handle.query(CaseWorkflow.status)}")


async def to_match(services: Services) -> dict[str, Any]:
    """Records and insurance (no cost to the patient) done: the case's review.match command."""
    await services.expect("records.collect")
    services.insurance_verified(patient_cost="0")
    services.records_assembled()
    return await services.expect("review.match")


async def to_review(handle: WorkflowHandle, services: Services, reviewer: str = "spec-gyn-1") -> str:
    """Drive a case through records, insurance and the cost decision to an accepted offer."""
    collect = await services.expect("records.collect")
    assert collect["data"]["exam"]["exam_type"] == "pelvic" and collect["data"]["partner_id"] == "partner-a"
    await services.expect("insurance.verify")
    services.insurance_verified()
    services.records_assembled()
    await wait_status(handle, CaseStatus.AWAITING_PATIENT_DECISION)
    await decide(
        handle, CaseWorkflow.decide_cost, CostDecision(choice=CostChoice.ACCEPT, by="patient-portal")
    )
    await services.expect("review.match")
    review_id = f"rev-{uuid.uuid4().hex[:6]}"
    services.offered(review_id, reviewer)
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    services.send(ReviewAccepted(case_id=services.case_id, review_id=review_id, reviewer_id=reviewer))
    await wait_status(handle, CaseStatus.IN_REVIEW)
    return review_id


async def to_follow_up(handle: WorkflowHandle, services: Services) -> str:
    """Drive a case to an accepted offer, its review submitted, report rp1 composed and delivered: follow-up."""
    review_id = await to_review(handle, services)
    services.send(
        ReviewSubmitted(
            case_id=services.case_id, review_id=review_id, reviewer_id="spec-gyn-1", agreement="concordant"
        )
    )
    await services.expect("report.compose")
    services.send(
        ReportReady(case_id=services.case_id, report_id="rp1", pdf_url="p", fhir_url="f", sha256="0" * 64)
    )
    await services.expect("report.deliver")
    services.send(
        ReportDelivered(
            case_id=services.case_id, report_id="rp1", recipient="NPI", delivered_at=datetime.now(UTC)
        )
    )
    await wait_status(handle, CaseStatus.FOLLOW_UP)
    return review_id


async def test_case_runs_from_request_to_closed_and_drops_duplicate_events(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_review(handle, services)

    submitted = ReviewSubmitted(
        case_id=services.case_id, review_id=review_id, reviewer_id="spec-gyn-1", agreement="concordant"
    )
    services.send(submitted, event_id="sub-1")
    compose = await services.expect("report.compose")
    assert compose["data"]["review_id"] == review_id
    services.send(submitted, event_id="sub-1")  # a late duplicate changes nothing
    services.send(
        ReportReady(
            case_id=services.case_id,
            report_id="rp1",
            pdf_url="http://x/pdf",
            fhir_url="http://x/fhir",
            sha256="0" * 64,
        )
    )
    await services.expect("report.deliver", report_id="rp1")
    services.send(
        ReportDelivered(
            case_id=services.case_id,
            report_id="rp1",
            recipient="NPI 1234567893",
            delivered_at=datetime.now(UTC),
        )
    )
    await wait_status(handle, CaseStatus.FOLLOW_UP)
    await decide(handle, CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
    outcome = await asyncio.wait_for(handle.result(), timeout=30)
    services.close()
    await keep_history(handle, "closed_after_review")

    assert outcome.status == CaseStatus.CLOSED and outcome.reviewer_id == "spec-gyn-1"
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(CASE_STATUS) == "closed"
    assert description.typed_search_attributes.get(ASSIGNED_REVIEWER) == "spec-gyn-1"
    statuses = [t.status for t in await handle.query(CaseWorkflow.timeline) if t.kind == "transition"]
    assert statuses == [
        CaseStatus.AWAITING_RECORDS,
        CaseStatus.AWAITING_PATIENT_DECISION,
        CaseStatus.MATCHING,
        CaseStatus.AWAITING_ACCEPTANCE,
        CaseStatus.IN_REVIEW,
        CaseStatus.COMPOSING_REPORT,
        CaseStatus.DELIVERING,
        CaseStatus.DELIVERED,
        CaseStatus.FOLLOW_UP,
        CaseStatus.CLOSED,
    ]
    assert [(d.name, d.by) for d in await handle.query(CaseWorkflow.decisions)] == [
        ("decide_cost", "patient-portal"),
        ("close", "dr-a"),
    ]


async def test_records_reminders_escalation_and_late_records_move_the_due_date(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(client, settings, urgency=Urgency.STANDARD)
    await services.expect("records.collect")
    services.send(RecordsIncomplete(case_id=services.case_id, missing=["original report", "cine clip"]))
    for _ in range(100):
        details = await current_details(handle)
        if "cine clip" in details:
            break
        await asyncio.sleep(0.1)
    assert "**Waiting for:** the original report and ultrasound images" in details
    assert "**Missing:** original report, cine clip" in details
    await temporal_env.fast_forward(handle, timedelta(hours=25))
    assert (await services.expect("records.remind"))["data"]["attempt"] == 1
    await temporal_env.fast_forward(handle, timedelta(hours=48))
    assert (await services.expect("records.remind"))["data"]["attempt"] == 2
    await temporal_env.fast_forward(handle, timedelta(hours=48))
    escalation = await services.expect("case.alert", kind="records_escalated")
    assert "operations" in escalation["data"]["detail"]
    assert "records.remind" not in services.types()  # two reminders only

    due_before = await handle.query(CaseWorkflow.due_at)
    services.records_assembled()
    moved = await services.expect("case.alert", kind="due_date_moved")
    due_after = await handle.query(CaseWorkflow.due_at)
    assert due_after > due_before and "5 business days" in moved["data"]["detail"]
    description = await handle.describe()
    assert description.typed_search_attributes.get(CASE_DUE_AT) == due_after
    await keep_history(handle, "records_reminders_escalation")
    await handle.terminate("test done")
    services.close()


async def test_the_match_command_names_the_partners_order_with_its_system(
    client: Client, settings: Settings
) -> None:
    """The review's DiagnosticReport.basedOn names the order as the partner sent it: value and system."""
    handle, services = await start(
        client, settings, partner_case_ref="777", partner_case_ref_system="urn:oid:2.16.840.1.113883.19.5.1"
    )
    match = await to_match(services)
    assert (match["data"]["partner_case_ref"], match["data"]["partner_case_ref_system"]) == (
        "777",
        "urn:oid:2.16.840.1.113883.19.5.1",
    )
    await handle.terminate("test done")
    services.close()


async def test_decline_and_expiry_rematch_excluding_those_reviewers(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(client, settings)
    first = await to_match(services)
    assert first["data"]["exclude_reviewers"] == []

    services.offered("r1", "spec-a")
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    services.send(
        ReviewDeclined(case_id=services.case_id, review_id="r1", reviewer_id="spec-a", reason="on leave")
    )
    second = await services.expect("review.match")
    assert second["data"]["exclude_reviewers"] == ["spec-a"]

    services.offered("r2", "spec-b")
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    await temporal_env.fast_forward(handle, timedelta(hours=25))
    withdraw = await services.expect("review.withdraw")
    assert withdraw["data"] == {"case_id": services.case_id, "review_id": "r2", "reason": "expired"}
    third = await services.expect("review.match")
    assert third["data"]["exclude_reviewers"] == ["spec-a", "spec-b"]
    # Another review replica may take the match before the withdrawal: the match carries it (a decline, none).
    assert (second["data"]["withdraw"], third["data"]["withdraw"]) == (None, withdraw["data"])
    details = [t.detail for t in await handle.query(CaseWorkflow.timeline)]
    assert any("spec-a declined: on leave" in d for d in details)
    assert any("offer to spec-b lapsed" in d for d in details)
    await keep_history(handle, "offer_declined_and_expired")
    await handle.terminate("test done")
    services.close()


async def test_an_urgent_cases_unanswered_offer_lapses_within_a_quarter_of_the_time_left(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    # Due in 20 h: the default 24 h offer would use up the whole turnaround; it lapses after about 5 h.
    handle, services = await start(
        client, settings, urgency=Urgency.URGENT, due_at=datetime.now(UTC) + timedelta(hours=20)
    )
    await to_match(services)
    services.offered("r1", "spec-a")
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    await temporal_env.fast_forward(handle, timedelta(hours=6))
    withdraw = await services.expect("review.withdraw")
    assert withdraw["data"] == {"case_id": services.case_id, "review_id": "r1", "reason": "expired"}
    rematch = await services.expect("review.match")
    assert rematch["data"]["exclude_reviewers"] == ["spec-a"]
    await keep_history(handle, "urgent_offer_lapses")
    await handle.terminate("test done")
    services.close()


async def test_every_decision_in_the_wrong_state_is_rejected_before_it_is_written(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    history_before = len((await handle.fetch_history()).events)
    wrong = [
        (
            CaseWorkflow.decide_cost,
            CostDecision(choice=CostChoice.ACCEPT, by="p"),
            "no cost decision is pending",
        ),
        (
            CaseWorkflow.reassign_reviewer,
            ReassignReviewer(by="ops", reason="conflict"),
            "can be reassigned only",
        ),
        (CaseWorkflow.resume, ResumeCase(by="ops"), "not on hold"),
        (
            CaseWorkflow.ask_question,
            FollowUpQuestion(by="dr", question_id="q1", text="why?"),
            "after the report",
        ),
        (CaseWorkflow.close, CloseCase(by="dr"), "after its report is delivered"),
        (
            CaseWorkflow.reconcile_identity,
            IdentityDecision(by="ops", import_id="imp-9", choice=IdentityChoice.ACCEPT, reason="same person"),
            "not waiting for an identity decision",
        ),
        (CaseWorkflow.document_communication, told_by_phone(), "no communication is awaited"),
    ]
    for update, argument, message in wrong:
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await handle.execute_update(update, argument)
        assert message in str(failed.value.cause), (update, failed.value.cause)
    assert len((await handle.fetch_history()).events) == history_before  # nothing was written
    assert await handle.query(CaseWorkflow.decisions) == []
    await handle.terminate("test done")
    services.close()


async def workflow_task_failures(handle: WorkflowHandle) -> int:
    """How often a workflow task of the case failed: each is retried with the same history, so a case with one
    that keeps failing is stuck."""
    history = await handle.fetch_history()
    return sum(event.HasField("workflow_task_failed_event_attributes") for event in history.events)


async def test_an_update_sent_with_null_is_refused_and_the_case_goes_on(
    client: Client, settings: Settings
) -> None:
    """A null input (a script's None, the CLI's `--input-meta encoding=binary/null`) reaches a validator as None,
    not as a model: a validator that did not look at it accepted the update, and its handler failed the workflow
    task on every retry."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    updates = [
        "cancel",
        "decide_cost",
        "reconcile_identity",
        "reassign_reviewer",
        "document_communication",
        "hold",
        "resume",
        "ask_question",
        "close",
    ]
    for update in updates:
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await asyncio.wait_for(handle.execute_update(update, None), timeout=10)
        assert f"update {update} needs its input" in str(refused.value.cause), refused.value.cause
        assert "not null" in str(refused.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as nobody:
        await handle.execute_update(CaseWorkflow.hold, HoldCase(by="  ", reason="call back"))
    assert "`by` is blank" in str(nobody.value.cause)
    # A reason is required where the model asks for one (at least 3 characters): spaces are not one.
    with pytest.raises(WorkflowUpdateFailedError) as no_reason:
        await handle.execute_update(CaseWorkflow.cancel, CancelCase(by="ops-1", reason="    "))
    assert "update cancel: `reason` is blank" in str(no_reason.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as no_reason:
        await handle.execute_update(CaseWorkflow.hold, HoldCase(by="ops-1", reason=" \t "))
    assert "update hold: `reason` is blank" in str(no_reason.value.cause)
    assert await workflow_task_failures(handle) == 0
    assert await handle.query(CaseWorkflow.decisions) == []

    await decide(
        handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="call back")
    )  # still steered as before
    await wait_status(handle, CaseStatus.ON_HOLD)
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    services.insurance_verified(patient_cost="0")
    services.records_assembled()
    await services.expect("review.match")
    await handle.terminate("test done")
    services.close()


async def test_cancellation_mid_review_withdraws_work_everywhere(client: Client, settings: Settings) -> None:
    handle, services = await start(client, settings)
    await to_review(handle, services)
    result = await decide(handle, CaseWorkflow.cancel, CancelCase(by="ops-1", reason="patient withdrew"))
    assert "cancelled" in result
    cancelled = await services.expect("case.cancelled")
    assert cancelled["data"]["reason"] == "patient withdrew" and cancelled["data"]["cancelled_by"] == "ops-1"
    outcome = await asyncio.wait_for(handle.result(), timeout=20)
    assert outcome.status == CaseStatus.CANCELLED
    assert (await handle.describe()).typed_search_attributes.get(CASE_STATUS) == "cancelled"
    await keep_history(handle, "cancelled_in_review")
    with pytest.raises(Exception):  # noqa: B017 - the workflow is closed: no decision reaches it
        await decide(handle, CaseWorkflow.hold, HoldCase(by="ops", reason="late"))
    services.close()


async def test_a_case_cancelled_while_on_hold_ends_cancelled(client: Client, settings: Settings) -> None:
    """Cancelling is operations' decision over their own hold: the case ended with status `on_hold`, in the
    outcome and in the CaseStatus the Temporal UI lists it by."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="waiting for a call back"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    await decide(handle, CaseWorkflow.cancel, CancelCase(by="ops-1", reason="patient withdrew"))
    assert (await services.expect("case.cancelled"))["data"]["cancelled_by"] == "ops-1"
    outcome = await asyncio.wait_for(handle.result(), timeout=20)
    await keep_history(handle, "cancelled_on_hold")
    services.close()
    assert outcome.status == CaseStatus.CANCELLED
    assert (await handle.describe()).typed_search_attributes.get(CASE_STATUS) == "cancelled"
    statuses = [t.status for t in await handle.query(CaseWorkflow.timeline) if t.kind == "transition"]
    assert statuses[-2:] == [CaseStatus.ON_HOLD, CaseStatus.CANCELLED]


async def test_a_held_case_is_steered_by_where_it_stands(client: Client, settings: Settings) -> None:
    """Validators judged a held case by `on_hold`: a delivered case could be cancelled by holding it first, and a
    decision due where it stands was refused with a false reason ("no cost decision is pending"). Decided
    while on hold, nothing goes out until it is resumed."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    services.insurance_verified()
    services.records_assembled()
    await wait_status(handle, CaseStatus.AWAITING_PATIENT_DECISION)
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="billing question"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    await decide(
        handle, CaseWorkflow.decide_cost, CostDecision(choice=CostChoice.ACCEPT, by="patient-portal")
    )
    with pytest.raises(AssertionError, match="no review.match"):
        await services.expect("review.match", timeout=1.5)  # nothing goes out while on hold
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    await services.expect("review.match")
    # Each status change is numbered as the case made it, so intake's mirror keeps the last one made even where
    # two carry one time (a hold and a resume in one workflow task) and arrive the other way round.
    changes = [
        await services.expect("case.status_changed", status=status)
        for status in ("awaiting_records", "awaiting_patient_decision", "on_hold", "matching")
    ]
    assert [change["data"]["seq"] for change in changes] == [1, 2, 3, 4]
    assert changes[3]["data"]["detail"] == "resumed by ops-2"
    await handle.terminate("test done")
    services.close()

    # The resume releases the closing step and announces `closed` itself: the case completed as soon as its
    # closing step was out, with the resume still publishing (its caller got "Workflow Update failed because the
    # Workflow completed before the Update completed", and the SDK warned of an unfinished handler). Here the
    # resume's announcement is slow, so that it always comes after the closing step.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        async with late_resume_worker(client, settings) as (queue, slowed):
            handle, services = await start(client, settings, task_queue=queue)
            await to_follow_up(handle, services)
            await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="checking the recipient"))
            await wait_status(handle, CaseStatus.ON_HOLD)
            with pytest.raises(WorkflowUpdateFailedError) as delivered:
                await handle.execute_update(
                    CaseWorkflow.cancel, CancelCase(by="ops-1", reason="patient withdrew")
                )
            assert "the report is already follow_up (on hold); a delivered case cannot be cancelled" in str(
                delivered.value.cause
            )
            await decide(handle, CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
            # Closed where it stands, on hold: a question now would never reach the specialist.
            with pytest.raises(WorkflowUpdateFailedError) as too_late:
                await handle.execute_update(
                    CaseWorkflow.ask_question, FollowUpQuestion(by="dr-a", question_id="q9", text="one more?")
                )
            assert "cannot ask a question: the case is closed (on hold)" in str(too_late.value.cause)
            assert await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2")) == "resumed in closed"
            assert (await asyncio.wait_for(handle.result(), timeout=20)).status == CaseStatus.CLOSED
            assert slowed.is_set()
            await keep_history(handle, "closed_on_hold_resumed_late")
            decisions = [d.name for d in await handle.query(CaseWorkflow.decisions)]
    assert decisions == ["decide_cost", "hold", "close", "resume"]
    assert [str(w.message) for w in warned if issubclass(w.category, UnfinishedUpdateHandlersWarning)] == []
    await services.expect("review.close")
    await services.expect("case.status_changed", status="closed")  # announced by the resume
    assert "case.cancelled" not in services.types()
    services.close()


class ResumeAnnouncedLate(CaseActivities):
    """The case's activities, with the status change a resume announces published late: it waits until the SDK
    warns that the case finished while an update was still running, or for a second."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.warned = threading.Event()
        self.slowed = threading.Event()

    @activity.defn(name="publish_event")
    def publish_event(self, event: PublishEvent) -> str:
        if event.type == "case.status_changed" and event.data["detail"].startswith("resumed by"):
            self.slowed.set()
            self.warned.wait(1)
        return super().publish_event(event)


@contextlib.asynccontextmanager
async def case_worker(client: Client, settings: Settings, activities: CaseActivities) -> AsyncIterator[str]:
    """A worker of the case workflow with `activities`, on a task queue of its own (yielded): a test may stop it
    and start another on the same queue."""
    queue = f"cases-{uuid.uuid4().hex[:8]}"
    async with worker_on(client, settings, queue, activities):
        yield queue


@contextlib.asynccontextmanager
async def worker_on(
    client: Client, settings: Settings, queue: str, activities: CaseActivities
) -> AsyncIterator[None]:
    with ThreadPoolExecutor(4) as executor:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[CaseWorkflow],
            workflow_runner=SandboxedWorkflowRunner(),
            activities=[activities.publish_command, activities.publish_event, activities.publish_batch],
            activity_executor=executor,
        ):
            yield


@contextlib.asynccontextmanager
async def late_resume_worker(
    client: Client, settings: Settings
) -> AsyncIterator[tuple[str, threading.Event]]:
    """A worker of the case workflow on a task queue of its own whose resume announcements are late; yields the
    queue and an event set once a resume's announcement was held back."""
    activities = ResumeAnnouncedLate(settings)
    show = warnings.showwarning

    def showing(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, UnfinishedUpdateHandlersWarning):
            activities.warned.set()
        show(message, category, *args, **kwargs)

    async with case_worker(client, settings, activities) as queue:
        warnings.showwarning = showing
        try:
            yield queue, activities.slowed
        finally:
            warnings.showwarning = show


async def admitted(client: Client, handle: WorkflowHandle, update_id: str) -> None:
    """Once the server holds update `update_id` for the case (admitted), whether or not a worker took it yet."""
    request = PollWorkflowExecutionUpdateRequest(
        namespace=client.namespace,
        update_ref=UpdateRef(
            workflow_execution=WorkflowExecution(workflow_id=handle.id), update_id=update_id
        ),
        wait_policy=WaitPolicy(
            lifecycle_stage=UpdateWorkflowExecutionLifecycleStage.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_ADMITTED
        ),
    )
    for _ in range(200):
        try:
            await client.workflow_service.poll_workflow_execution_update(request)
            return
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # not sent yet
                raise
        await asyncio.sleep(0.02)
    raise AssertionError(f"update {update_id} never reached the server")


async def test_a_hold_and_a_resume_in_one_workflow_task_leave_intakes_mirror_resumed(
    client: Client, settings: Settings
) -> None:
    """Operations held a case and resumed it while its worker was away: both decisions reached the case in one
    workflow task, and both status changes carry one `at`. Intake's mirror kept whichever it applied last, and
    showed `on_hold` for a resumed case when the resume's message came first (two replicas, a redelivery)."""
    intake = intake_engines(settings)[0]
    case_id = a_case(intake)
    activities = CaseActivities(settings)
    async with case_worker(client, settings, activities) as queue:
        handle, services = await start(client, settings, task_queue=queue, case_id=case_id)
        await services.expect("records.collect")
        await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    hold = asyncio.create_task(
        handle.execute_update(CaseWorkflow.hold, HoldCase(by="ops-2", reason="call back"), id="hold")
    )
    await admitted(client, handle, "hold")
    resume = asyncio.create_task(
        handle.execute_update(CaseWorkflow.resume, ResumeCase(by="ops-2"), id="resume")
    )
    await admitted(client, handle, "resume")
    async with worker_on(client, settings, queue, activities):
        assert await hold == "case on hold; the due date keeps running"
        assert await resume == "resumed in awaiting_records"
        held = await services.expect("case.status_changed", status="on_hold")
        resumed = await services.expect("case.status_changed", detail="resumed by ops-2")
        await handle.terminate("test done")
    services.close()
    assert held["data"]["at"] == resumed["data"]["at"]  # one workflow task

    mirror = Consumer(settings=settings, queue="intake", engine=intake, handle=intake_consumer.handle)
    for message in (resumed, held):  # the other way round
        assert mirror.apply(CloudEvent.model_validate(message))
    assert mirrored_status(intake, case_id) == CaseStatus.AWAITING_RECORDS


async def test_declining_the_cost_cancels_the_case(client: Client, settings: Settings) -> None:
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    services.insurance_verified()
    services.records_assembled()
    await wait_status(handle, CaseStatus.AWAITING_PATIENT_DECISION)
    await decide(
        handle,
        CaseWorkflow.decide_cost,
        CostDecision(choice=CostChoice.DECLINE, by="patient", reason="too expensive"),
    )
    assert (await services.expect("case.cancelled"))["data"]["cancelled_by"] == "patient"
    assert (await asyncio.wait_for(handle.result(), timeout=20)).status == CaseStatus.CANCELLED
    assert "review.match" not in services.types()
    services.close()


async def test_consent_identity_mismatch_hold_and_resume(client: Client, settings: Settings) -> None:
    handle, services = await start(client, settings, consent_on_file=False)
    await wait_status(handle, CaseStatus.AWAITING_CONSENT)
    await asyncio.sleep(0.5)
    assert "records.collect" not in services.types()  # no retrieval without a records-release authorization
    await handle.signal(CaseWorkflow.consent_received, ConsentReceived(by="partner-a", document_id="doc-1"))
    await services.expect("records.collect")

    services.send(
        IdentityMismatch(
            case_id=services.case_id, import_id="imp-1", differences=["PatientBirthDate", "PatientSex"]
        )
    )
    await wait_status(handle, CaseStatus.IDENTITY_MISMATCH)
    await decide(
        handle,
        CaseWorkflow.reconcile_identity,
        IdentityDecision(
            by="ops-2", import_id="imp-1", choice=IdentityChoice.REJECT, reason="another patient"
        ),
    )
    reconcile = await services.expect("records.reconcile")
    assert reconcile["data"]["decision"] == "reject" and reconcile["data"]["decided_by"] == "ops-2"
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)

    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="waiting for a call back"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    services.insurance_verified(patient_cost="0")
    services.records_assembled()
    await asyncio.sleep(1)
    assert "review.match" not in services.types()  # nothing goes out while on hold
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    await services.expect("review.match")
    names = [d.name for d in await handle.query(CaseWorkflow.decisions)]
    assert names == ["consent_received", "reconcile_identity", "hold", "resume"]
    await keep_history(handle, "consent_identity_hold_resume")
    await handle.terminate("test done")
    services.close()


async def temporal_cli(client: Client, *args: str, refused: bool = False) -> str:
    """Run the `temporal` CLI against the test server as operations staff would, typing JSON by hand; it exits 0,
    or with `refused` non-zero."""
    process = await asyncio.create_subprocess_exec(
        temporal_binary(),
        "--address",
        client.service_client.config.target_host,
        "--namespace",
        client.namespace,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert (process.returncode != 0) if refused else (process.returncode == 0), output
    return output.decode()


@contextlib.contextmanager
def codec_server(settings: Settings) -> Iterator[str]:
    """The codec server (`make codec-server`) on a free loopback port, so the CLI reads the case's answers."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_codec_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the codec server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def test_an_update_sent_without_input_by_the_cli_is_refused_naming_what_it_takes(
    client: Client, settings: Settings
) -> None:
    """`temporal workflow update execute --name hold` without --input (or with two) reached the validator as the
    SDK's TypeError about a missing Python argument: the operator read `_validate_hold() missing 1 required
    positional argument: 'request'`, not what to send."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    takes = {
        "cancel": "by, reason",
        "decide_cost": "by, reason, choice",
        "reconcile_identity": "by, reason, import_id, choice",
        "reassign_reviewer": "by, reason, reviewer_id",
        "document_communication": "by, reason, communication",
        "hold": "by, reason",
        "resume": "by, reason",
        "ask_question": "by, reason, question_id, text",
        "close": "by, reason",
    }
    with codec_server(settings) as codec:
        update = ("workflow", "update", "execute", "-w", handle.id, "--codec-endpoint", codec, "--name")
        said = await asyncio.gather(*(temporal_cli(client, *update, name, refused=True) for name in takes))
        two = await temporal_cli(
            client, *update, "hold", "--input", '{"by": "ops-1"}', "--input", '{"reason": "x"}', refused=True
        )
        mistyped = await temporal_cli(
            client, *update, "hold", "--input", '{"by": "ops-1", "reson": "call back"}', refused=True
        )
    for (name, fields), output in zip(takes.items(), said, strict=True):
        assert f"update {name} needs its input as one JSON object ({fields}), it came with none" in output, (
            output
        )
        assert "TypeError" not in output and "positional argument" not in output
    assert "update hold needs its input as one JSON object (by, reason), not 2 inputs" in two, two
    assert (
        "update hold: reason: Field required; reson: Extra inputs are not permitted; send one JSON object "
        "(by, reason)" in mistyped
    ), mistyped
    assert "call back" not in mistyped  # by field and rule, never the value sent
    assert await workflow_task_failures(handle) == 0
    assert await handle.query(CaseWorkflow.decisions) == []
    assert await handle.query(CaseWorkflow.status) == CaseStatus.AWAITING_RECORDS
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="call back"))  # still steered
    await wait_status(handle, CaseStatus.ON_HOLD)
    await handle.terminate("test done")
    services.close()


async def test_a_signal_that_does_not_fit_is_noted_and_the_case_goes_on(
    client: Client, settings: Settings
) -> None:
    """Signals are written before the workflow sees them. One without input failed the workflow task on every
    retry (the case stuck); one with a wrong shape or a mistyped name vanished without a trace."""
    handle, services = await start(client, settings, consent_on_file=False)
    await wait_status(handle, CaseStatus.AWAITING_CONSENT)
    await temporal_cli(client, "workflow", "signal", "-w", handle.id, "--name", "consent_received")
    await temporal_cli(
        client,
        "workflow",
        "signal",
        "-w",
        handle.id,
        "--name",
        "consent_received",
        "--input",
        '{"by": "ops-1", "documentId": "doc-1"}',
    )
    await handle.signal("consent_received", None)
    await handle.signal("consent_received", args=[{"by": "ops-1"}, {"document_id": "doc-1"}])
    await handle.signal("on_event")
    await handle.signal("on_event", {"id": "e1", "type": "records.assembled"})
    await handle.signal("consent-received", {"by": "ops-1", "document_id": "doc-1"})
    for _ in range(100):
        notes = [t.detail for t in await handle.query(CaseWorkflow.timeline) if t.kind == "note"]
        if len(notes) == 7:
            break
        await asyncio.sleep(0.1)
    assert notes == [
        "signal consent_received ignored: it carried no input; send it again with one JSON object "
        "(by, reason, document_id)",
        "signal consent_received ignored: document_id: Field required; documentId: Extra inputs are not "
        "permitted; send it again with one JSON object (by, reason, document_id)",
        "signal consent_received ignored: its input was null; send it again with one JSON object "
        "(by, reason, document_id)",
        "signal consent_received ignored: it carried 2 inputs; send it again with one JSON object "
        "(by, reason, document_id)",
        "signal on_event ignored: it carried no input; send it again with one JSON object "
        "(specversion, id, source, type, subject, time, datacontenttype, data)",
        "signal on_event ignored: source: Field required; subject: Field required; time: Field required; send it "
        "again with one JSON object (specversion, id, source, type, subject, time, datacontenttype, data)",
        "signal consent-received ignored: this case takes the signals on_event, consent_received",
    ]
    assert await workflow_task_failures(handle) == 0
    assert await handle.query(CaseWorkflow.status) == CaseStatus.AWAITING_CONSENT

    await temporal_cli(
        client,
        "workflow",
        "signal",
        "-w",
        handle.id,
        "--name",
        "consent_received",
        "--input",
        '{"by": "ops-1", "document_id": "doc-1"}',
    )
    await services.expect("records.collect")
    assert [d.name for d in await handle.query(CaseWorkflow.decisions)] == ["consent_received"]
    await handle.terminate("test done")
    services.close()


async def test_an_event_whose_data_does_not_fit_its_type_is_noted_and_the_case_goes_on(
    client: Client, settings: Settings
) -> None:
    """The envelope fits, its data does not (typed by hand into a signal; through the broker the bridge
    dead-letters such an event before it reaches the case, test_event_bridge): the case took the event in, and
    reading it failed the workflow task on every retry."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)

    def event(event_id: str, type_: str, data: dict[str, Any]) -> CloudEvent:
        return CloudEvent(
            id=event_id,
            source="/ops",
            type=type_,
            subject=services.case_id,
            time=datetime.now(UTC),
            data=data,
        )

    await handle.signal(
        CaseWorkflow.on_event,
        event("ops-1", "records.assembled", {"case_id": services.case_id, "file_count": "3"}),
    )
    await handle.signal(
        CaseWorkflow.on_event, event("svc-1", "records.incomplete", {"case_id": services.case_id})
    )
    for _ in range(100):
        notes = [t.detail for t in await handle.query(CaseWorkflow.timeline) if t.kind == "note"]
        if len(notes) == 2:
            break
        await asyncio.sleep(0.1)
    assert notes == [
        "event records.assembled ops-1 ignored: report: Field required; study: Field required (the same id may "
        "be sent again, corrected); nothing was applied",
        "event records.incomplete svc-1 ignored: missing: Field required (the same id may be sent again, "
        "corrected); nothing was applied",
    ]
    assert await workflow_task_failures(handle) == 0
    assert await handle.query(CaseWorkflow.received) == []

    services.insurance_verified(patient_cost="0")
    services.records_assembled(event_id="ops-1")  # corrected, under the same id
    await services.expect("review.match")
    await handle.terminate("test done")
    services.close()


async def test_an_event_of_another_case_is_noted_and_not_applied(client: Client, settings: Settings) -> None:
    """An event pasted into the wrong case (by hand: the bridge routes by subject) was applied to it: another
    patient's records assembled for this one."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    other = str(uuid.uuid4())
    assembled = RecordsAssembled(
        case_id=other,
        report=OriginalReport(content_type="text/plain", sha256="ab" * 32, text="complex cyst"),
        study=StudySummary(
            study_instance_uid="1.2.3", modality="US", instance_count=2, multiframe_count=1, series_count=1
        ),
        file_count=3,
    )
    await handle.signal(
        CaseWorkflow.on_event, new_event(id="other-1", source="/ops", subject=other, data=assembled)
    )
    await handle.signal(
        CaseWorkflow.on_event,
        new_event(id="other-2", source="/ops", subject=services.case_id, data=assembled),
    )
    for _ in range(100):
        notes = [t.detail for t in await handle.query(CaseWorkflow.timeline) if t.kind == "note"]
        if len(notes) == 2:
            break
        await asyncio.sleep(0.1)
    assert notes == [
        f"event records.assembled other-1 ignored: it is about case {other}, not this one; nothing was applied",
        f"event records.assembled other-2 ignored: its data is about case {other}, not this one; nothing was "
        "applied",
    ]
    assert await handle.query(CaseWorkflow.received) == []
    services.insurance_verified(patient_cost="0")
    services.records_assembled()
    await services.expect("review.match")
    await handle.terminate("test done")
    services.close()


async def test_prior_authorization_holds_the_case_with_reminders_until_satisfied(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    services.records_assembled()
    services.insurance_verified(patient_cost="0", authorization="auth-needed")
    await wait_status(handle, CaseStatus.AWAITING_INSURANCE)
    await temporal_env.fast_forward(handle, timedelta(hours=49))
    reminder = await services.expect("case.alert", kind="authorization_reminder")
    assert "reminder 1" in reminder["data"]["detail"]
    assert "review.match" not in services.types()
    services.insurance_verified(patient_cost="0", authorization="satisfied")
    await services.expect("review.match")
    await handle.terminate("test done")
    services.close()


async def test_at_risk_then_breach_alerts_are_recorded(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(
        client, settings, urgency=Urgency.URGENT, due_at=datetime.now(UTC) + timedelta(hours=24)
    )
    await services.expect("records.collect")
    await temporal_env.fast_forward(handle, timedelta(hours=19))
    at_risk = await services.expect("case.alert", kind="at_risk")
    assert "75%" in at_risk["data"]["detail"]
    await temporal_env.fast_forward(handle, timedelta(hours=6))
    breached = await services.expect("case.alert", kind="breached")
    assert "passed in status" in breached["data"]["detail"]
    assert [a.kind for a in await handle.query(CaseWorkflow.alerts) if a.kind in ("at_risk", "breached")] == [
        "at_risk",
        "breached",
    ]
    await keep_history(handle, "at_risk_and_breached")
    await handle.terminate("test done")
    services.close()


async def test_reassignment_withdraws_the_reviewer_and_matches_the_named_one(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_review(handle, services, reviewer="spec-x")
    await decide(
        handle,
        CaseWorkflow.reassign_reviewer,
        ReassignReviewer(by="ops-3", reason="conflict of interest", reviewer_id="spec-y"),
    )
    withdraw = await services.expect("review.withdraw")
    assert withdraw["data"]["review_id"] == review_id and withdraw["data"]["reason"] == "reassigned"
    rematch = await services.expect("review.match")
    assert rematch["data"]["preferred_reviewer"] == "spec-y" and rematch["data"]["exclude_reviewers"] == [
        "spec-x"
    ]
    await handle.terminate("test done")
    services.close()


async def test_a_reassignment_that_arrives_with_the_submitted_review_is_refused(
    temporal_env, settings: Settings, client: Client
) -> None:  # type: ignore[no-untyped-def]
    """The review was submitted, the case not yet past in_review: the reassignment was accepted ("the current
    reviewer will be withdrawn"), audited, and never done. The case's worker is stopped so that both reach it
    in one workflow task, as they can under load."""
    env_client: Client = temporal_env.client
    case_id = str(uuid.uuid4())
    services = Services(settings, case_id)
    on_queue = settings.model_copy(update={"temporal_task_queue": f"reassign-{uuid.uuid4().hex[:6]}"})
    with ThreadPoolExecutor(4) as executor:
        async with build_worker(env_client, on_queue, executor):
            handle = await env_client.start_workflow(
                CaseWorkflow.run,
                case_input(case_id),
                id=f"case-{case_id}",
                task_queue=on_queue.temporal_task_queue,
            )
            review_id = await to_review(handle, services, reviewer="spec-x")
            with pytest.raises(WorkflowUpdateFailedError) as holder:
                await handle.execute_update(
                    CaseWorkflow.reassign_reviewer,
                    ReassignReviewer(by="ops-3", reason="conflict of interest", reviewer_id="spec-x"),
                )
            assert "spec-x already holds this case" in str(holder.value.cause)
    submitted = ReviewSubmitted(
        case_id=case_id, review_id=review_id, reviewer_id="spec-x", agreement="concordant"
    )
    await handle.signal(
        CaseWorkflow.on_event, new_event(id="sub-x", source="/test", subject=case_id, data=submitted)
    )
    reassigning = asyncio.create_task(
        handle.execute_update(
            CaseWorkflow.reassign_reviewer, ReassignReviewer(by="ops-3", reason="conflict of interest")
        )
    )
    await asyncio.sleep(0.5)
    with ThreadPoolExecutor(4) as executor:
        async with build_worker(env_client, on_queue, executor):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await asyncio.wait_for(reassigning, timeout=20)
            assert "the review by spec-x was already submitted" in str(refused.value.cause)
            compose = await services.expect("report.compose")
            assert compose["data"]["review_id"] == review_id
            assert "review.withdraw" not in services.types()
            assert "reassign_reviewer" not in [d.name for d in await handle.query(CaseWorkflow.decisions)]
            await handle.terminate("test done")
    services.close()


async def test_a_critical_result_alerts_operations_before_the_report_is_composed(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_review(handle, services)
    services.send(
        ReviewSubmitted(
            case_id=services.case_id,
            review_id=review_id,
            reviewer_id="spec-gyn-1",
            agreement="major_discrepancy",
            critical=True,
        )
    )
    alert = await services.expect("case.alert", kind="critical_result")
    assert "critical result" in alert["data"]["detail"] and "referring physician" in alert["data"]["detail"]
    await services.expect("report.compose")
    assert "critical_result" in [a.kind for a in await handle.query(CaseWorkflow.alerts)]
    await keep_history(handle, "critical_result_alert")
    await handle.terminate("test done")
    services.close()


def told_by_phone(at: datetime | None = None, by: str = "nurse-12") -> DocumentCommunication:
    """What operations document: the referring physician was told by telephone (just now)."""
    return DocumentCommunication(
        by=by,
        communication=DirectCommunication(
            recipient="Dr. Alex Kim",
            recipient_role="referring physician",
            method="telephone",
            at=at or datetime.now(UTC),
            read_back=True,
        ),
    )


async def to_untold_discrepancy(handle: WorkflowHandle, services: Services) -> str:
    """Drive a case to a major discrepancy submitted without a documented communication: it waits."""
    review_id = await to_review(handle, services)
    services.send(
        ReviewSubmitted(
            case_id=services.case_id,
            review_id=review_id,
            reviewer_id="spec-gyn-1",
            agreement="major_discrepancy",
            communicated=False,
        )
    )
    await wait_status(handle, CaseStatus.AWAITING_COMMUNICATION)
    return review_id


async def test_an_untold_major_discrepancy_waits_for_operations_to_document_the_communication(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(client, settings)
    await to_untold_discrepancy(handle, services)
    alert = await services.expect("case.alert", kind="critical_result")
    assert "without a documented communication" in alert["data"]["detail"]
    assert "document_communication" in alert["data"]["detail"]
    await temporal_env.fast_forward(handle, timedelta(minutes=61))  # operations is reminded every hour
    reminder = await services.expect("case.alert", kind="communication_reminder")
    assert reminder["data"]["detail"].startswith("reminder 1: the report has waited since ")
    assert "document_communication" in reminder["data"]["detail"]
    with pytest.raises(AssertionError, match="no report.compose"):
        await services.expect("report.compose", timeout=2)  # nothing is composed, let alone delivered
    assert "**Waiting for:** operations to document that the referring physician was told directly" in (
        await current_details(handle)
    )
    for _ in range(100):  # the Temporal UI's list view (visibility) catches up shortly after
        attributes = (await handle.describe()).typed_search_attributes
        if attributes.get(CASE_STATUS) == "awaiting_communication":
            break
        await asyncio.sleep(0.1)
    assert attributes.get(CASE_STATUS) == "awaiting_communication"

    history_before = len((await handle.fetch_history()).events)
    late = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(WorkflowUpdateFailedError) as future:
        await handle.execute_update(CaseWorkflow.document_communication, told_by_phone(at=late))
    assert "later than now" in str(future.value.cause)
    before_the_case = datetime.now(UTC) - timedelta(days=30)
    with pytest.raises(WorkflowUpdateFailedError) as early:
        await handle.execute_update(CaseWorkflow.document_communication, told_by_phone(at=before_the_case))
    assert "before the case began" in str(early.value.cause)
    # From the Temporal UI or CLI, as JSON: an e-mail is not a direct communication.
    emailed = told_by_phone().model_dump(mode="json")
    emailed["communication"]["method"] = "email"
    with pytest.raises(WorkflowUpdateFailedError) as indirect:
        await handle.execute_update("document_communication", emailed)
    # Refused by the validator: the reason names the field and what it takes, never the value sent.
    assert "update document_communication: communication.method" in str(indirect.value.cause)
    assert "'telephone' or 'in_person'" in str(indirect.value.cause)
    assert "email" not in str(indirect.value.cause)
    assert len((await handle.fetch_history()).events) == history_before  # nothing was written
    assert await handle.query(CaseWorkflow.status) == CaseStatus.AWAITING_COMMUNICATION

    told = told_by_phone()
    await decide(handle, CaseWorkflow.document_communication, told)
    compose = await services.expect("report.compose")
    communication = compose["data"]["communication"]
    assert {k: communication[k] for k in ("recipient", "recipient_role", "method", "read_back")} == {
        "recipient": "Dr. Alex Kim",
        "recipient_role": "referring physician",
        "method": "telephone",
        "read_back": True,
    }
    assert datetime.fromisoformat(communication["at"]) == told.communication.at
    assert communication["documented_by"] == "nurse-12"
    with pytest.raises(WorkflowUpdateFailedError) as twice:
        await handle.execute_update(CaseWorkflow.document_communication, told_by_phone(by="nurse-13"))
    assert "already documented by nurse-12" in str(twice.value.cause)

    services.send(
        ReportReady(case_id=services.case_id, report_id="rp1", pdf_url="p", fhir_url="f", sha256="0" * 64)
    )
    await services.expect("report.deliver", report_id="rp1")
    services.send(
        ReportDelivered(
            case_id=services.case_id, report_id="rp1", recipient="NPI", delivered_at=datetime.now(UTC)
        )
    )
    await wait_status(handle, CaseStatus.FOLLOW_UP)
    await decide(handle, CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
    assert (await asyncio.wait_for(handle.result(), timeout=30)).status == CaseStatus.CLOSED
    await keep_history(handle, "untold_major_discrepancy")
    services.close()

    statuses = [t.status for t in await handle.query(CaseWorkflow.timeline) if t.kind == "transition"]
    assert statuses[statuses.index(CaseStatus.IN_REVIEW) :][:4] == [
        CaseStatus.IN_REVIEW,
        CaseStatus.AWAITING_COMMUNICATION,
        CaseStatus.COMPOSING_REPORT,
        CaseStatus.DELIVERING,
    ]
    [documented] = [
        d for d in await handle.query(CaseWorkflow.decisions) if d.name == "document_communication"
    ]
    assert documented.by == "nurse-12" and documented.detail.startswith(
        "telephone to the referring physician at"
    )


async def test_a_major_discrepancy_the_specialist_documented_goes_straight_to_the_report(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_review(handle, services)
    services.send(
        ReviewSubmitted(
            case_id=services.case_id,
            review_id=review_id,
            reviewer_id="spec-gyn-1",
            agreement="major_discrepancy",
            communicated=True,
        )
    )
    alert = await services.expect("case.alert", kind="critical_result")
    assert "the specialist documented that the referring physician was told" in alert["data"]["detail"]
    compose = await services.expect("report.compose")
    assert compose["data"]["communication"] is None  # the review's own documentation is on the report
    with pytest.raises(WorkflowUpdateFailedError) as not_awaited:
        await handle.execute_update(CaseWorkflow.document_communication, told_by_phone())
    assert "no communication is awaited" in str(not_awaited.value.cause)
    await keep_history(handle, "told_major_discrepancy")
    await handle.terminate("test done")
    services.close()
    statuses = [t.status for t in await handle.query(CaseWorkflow.timeline) if t.kind == "transition"]
    assert CaseStatus.AWAITING_COMMUNICATION not in statuses


async def test_a_case_waiting_for_the_communication_can_be_held_resumed_and_cancelled(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    handle, services = await start(client, settings)
    await to_untold_discrepancy(handle, services)
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="the physician calls back tomorrow"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    await temporal_env.fast_forward(handle, timedelta(hours=3))
    with pytest.raises(AssertionError):  # held by operations' choice: not reminded of what they chose
        await services.expect("case.alert", kind="communication_reminder", timeout=2)
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    await wait_status(handle, CaseStatus.AWAITING_COMMUNICATION)
    await decide(handle, CaseWorkflow.cancel, CancelCase(by="ops-1", reason="patient withdrew"))
    assert (await services.expect("case.cancelled"))["data"]["cancelled_by"] == "ops-1"
    assert (await asyncio.wait_for(handle.result(), timeout=20)).status == CaseStatus.CANCELLED
    await keep_history(handle, "hold_and_cancel_awaiting_communication")
    assert "report.compose" not in services.types()
    services.close()


async def timers_and_events(
    client: Client, handle: WorkflowHandle, prefix: str
) -> tuple[list[timedelta], int]:
    """The durations of the history's timers whose summary starts with `prefix`, in order, and how many events
    the history holds from the first of them on (without those only time skipping writes)."""
    durations, first = [], None
    skipping = (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIME_SKIPPING_TRANSITIONED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_OPTIONS_UPDATED,
    )
    events = [e for e in (await handle.fetch_history()).events if e.event_type not in skipping]
    for index, event in enumerate(events):
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED and event.user_metadata.HasField("summary"):
            [summary] = await client.data_converter.decode([event.user_metadata.summary])
            if summary.startswith(prefix):
                first = index if first is None else first
                durations.append(event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta())
    return durations, len(events) - (first or len(events))


async def timers_once_started(
    client: Client, handle: WorkflowHandle, prefix: str, count: int, seconds: float = 10
) -> tuple[list[timedelta], int]:
    """`timers_and_events` once `count` such timers are in the history (or `seconds` passed). The query can
    answer a step's status before the timer the step starts is in the history (the step publishes its events
    in a local activity first; seen once in a loaded CI run, the last timer missing): read until it shows."""
    deadline = time.monotonic() + seconds
    while (
        len((found := await timers_and_events(client, handle, prefix))[0]) < count
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.1)
    return found


async def test_communication_reminders_back_off_so_a_month_long_wait_stays_far_from_the_history_limit(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    """Temporal ends a case whose history passes 51,200 events (it warns from 10,240). Reminded every hour, and woken
    every hour while on hold, a report waiting a month for the communication wrote 720 reminders; now hourly for 8
    hours, every 4 hours to the 7th day, then daily, and a hold sets no timer."""
    handle, services = await start(client, settings)
    await to_untold_discrepancy(handle, services)
    await temporal_env.fast_forward(handle, timedelta(hours=8, minutes=1))
    for _ in range(8):
        reminder = await services.expect("case.alert", kind="communication_reminder")
    assert reminder["data"]["detail"].startswith("reminder 8: ")
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="the physician calls back next week"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    await temporal_env.fast_forward(handle, timedelta(days=2))
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    await wait_status(handle, CaseStatus.AWAITING_COMMUNICATION)
    durations, events = await timers_once_started(client, handle, "communication reminder", 10)
    hour = timedelta(hours=1)
    # The 9th waited 4 hours (fired on hold: no reminder), the hold none, the next one after it 4 hours again.
    assert durations == [hour] * 8 + [4 * hour] * 2
    # Per reminder a timer, its firing, a workflow task (3 events) and the alert's local activity; hold and resume.
    assert events <= 6 * 8 + 20
    assert (
        len([a for a in await handle.query(CaseWorkflow.alerts) if a.kind == "communication_reminder"]) == 8
    )
    await keep_history(handle, "communication_reminders_back_off")
    await handle.terminate("test done")
    services.close()


async def test_a_case_no_specialist_is_available_for_matches_again_less_and_less_often(
    client: Client, settings: Settings, temporal_env
) -> None:  # type: ignore[no-untyped-def]
    """Unmatched, the case matched again every `rematch_after_hours` (1 h) for ever, ~12 history events each: the
    10,240-event warning in ~5 weeks. The wait doubles up to 6 hours; an offer starts it over."""
    handle, services = await start(client, settings)
    await to_match(services)
    for round_ in range(4):
        services.send(
            ReviewUnmatched(case_id=services.case_id, subspecialty="gyn", reason="none licensed in CA")
        )
        await wait_status(handle, CaseStatus.UNMATCHED)
        await temporal_env.fast_forward(handle, timedelta(hours=min(2**round_, 6), minutes=1))
        await services.expect("review.match")
    services.offered("r1", "spec-a")
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    services.send(
        ReviewDeclined(case_id=services.case_id, review_id="r1", reviewer_id="spec-a", reason="leave")
    )
    await services.expect("review.match")
    services.send(ReviewUnmatched(case_id=services.case_id, subspecialty="gyn", reason="none licensed in CA"))
    await wait_status(handle, CaseStatus.UNMATCHED)
    durations, events = await timers_once_started(client, handle, "match again", 5)
    hour = timedelta(hours=1)
    assert durations == [hour, 2 * hour, 4 * hour, 6 * hour, hour]
    # Per round a timer, its firing, the match and its answer (a signal), the status changes and what they send.
    assert events <= 16 * 5 + 30
    await keep_history(handle, "unmatched_rematch_backs_off")
    await handle.terminate("test done")
    services.close()


async def test_a_communication_documented_while_on_hold_composes_the_report_once_resumed(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    await to_untold_discrepancy(handle, services)
    await decide(handle, CaseWorkflow.hold, HoldCase(by="ops-2", reason="billing question"))
    await wait_status(handle, CaseStatus.ON_HOLD)
    await decide(handle, CaseWorkflow.document_communication, told_by_phone())
    with pytest.raises(AssertionError, match="no report.compose"):
        await services.expect("report.compose", timeout=1.5)  # nothing goes out while on hold
    await decide(handle, CaseWorkflow.resume, ResumeCase(by="ops-2"))
    compose = await services.expect("report.compose")
    assert compose["data"]["communication"]["documented_by"] == "nurse-12"
    await handle.terminate("test done")
    services.close()


async def test_follow_up_question_goes_to_the_specialist_and_is_redelivered(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_follow_up(handle, services)
    await decide(
        handle, CaseWorkflow.ask_question, FollowUpQuestion(by="dr-a", question_id="q1", text="MRI?")
    )
    question = await services.expect("review.question")
    assert question["data"]["review_id"] == review_id and question["data"]["text"] == "MRI?"
    services.send(
        QuestionAnswered(case_id=services.case_id, question_id="q1", review_id=review_id, report_id="rp2")
    )
    await services.expect("report.deliver", report_id="rp2")
    await keep_history(handle, "follow_up_question")
    await handle.terminate("test done")
    services.close()


async def test_a_case_closes_once_while_an_addendum_is_delivered(client: Client, settings: Settings) -> None:
    """While an answer's addendum was being delivered, close was refused as "a case closes after its report is
    delivered (status delivering)", though it was; and a second close was accepted and audited again."""
    handle, services = await start(client, settings)
    review_id = await to_follow_up(handle, services)
    await decide(
        handle, CaseWorkflow.ask_question, FollowUpQuestion(by="dr-a", question_id="q1", text="MRI?")
    )
    await services.expect("review.question")
    services.send(
        QuestionAnswered(case_id=services.case_id, question_id="q1", review_id=review_id, report_id="rp2")
    )
    await services.expect("report.deliver", report_id="rp2")
    await wait_status(handle, CaseStatus.DELIVERING)
    await decide(handle, CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
    with pytest.raises(WorkflowUpdateFailedError) as twice:
        await handle.execute_update(CaseWorkflow.close, CloseCase(by="dr-b"))
    assert "the case is already closing (asked by dr-a)" in str(twice.value.cause)
    services.send(
        ReportDelivered(
            case_id=services.case_id, report_id="rp2", recipient="NPI", delivered_at=datetime.now(UTC)
        )
    )
    assert (await asyncio.wait_for(handle.result(), timeout=20)).status == CaseStatus.CLOSED
    assert [d.name for d in await handle.query(CaseWorkflow.decisions)].count("close") == 1
    services.close()


async def test_the_specialists_own_addendum_is_redelivered_before_the_case_closes(
    client: Client, settings: Settings
) -> None:
    handle, services = await start(client, settings)
    review_id = await to_follow_up(handle, services)
    addended = ReportAddended(
        case_id=services.case_id, review_id=review_id, report_id="rp1", addendum_id="a1", version=2
    )
    services.send(addended, event_id="addended-a1")
    redelivery = await services.expect("report.deliver")
    services.send(addended, event_id="addended-a1")  # redelivered by the broker: delivered once
    services.send(
        ReportDelivered(
            case_id=services.case_id, report_id="rp1", recipient="NPI", delivered_at=datetime.now(UTC)
        )
    )
    await wait_status(handle, CaseStatus.FOLLOW_UP)
    await decide(handle, CaseWorkflow.close, CloseCase(by="dr-a", reason="no further questions"))
    outcome = await asyncio.wait_for(handle.result(), timeout=30)
    await keep_history(handle, "own_addendum")
    closing = await services.expect("review.close")
    services.close()

    assert redelivery["data"]["report_id"] == "rp1" and outcome.status == CaseStatus.CLOSED
    assert closing["data"]["reason"] == "by dr-a: no further questions"  # the report takes no more addenda
    assert closing["data"]["own_addenda_delivered"] == 1
    assert "report.deliver" not in services.types()
    timeline = await handle.query(CaseWorkflow.timeline)
    assert "the specialist's own addendum delivered (report version 2)" in [t.detail for t in timeline]
    statuses = [t.status for t in timeline if t.kind == "transition"]
    assert statuses[-7:] == [
        CaseStatus.DELIVERING,
        CaseStatus.DELIVERED,
        CaseStatus.FOLLOW_UP,
        CaseStatus.DELIVERING,  # the new version, through the same delivery as an answer's addendum
        CaseStatus.DELIVERED,
        CaseStatus.FOLLOW_UP,
        CaseStatus.CLOSED,
    ]


async def test_a_restarted_worker_resumes_the_case_where_it_was(
    temporal_env, settings: Settings, client: Client
) -> None:  # type: ignore[no-untyped-def]
    """The module's worker keeps running; a second case is started on a queue whose worker is stopped
    and replaced in the middle of the case."""
    env_client: Client = temporal_env.client
    case_id = str(uuid.uuid4())
    services = Services(settings, case_id)
    queue = f"restart-{uuid.uuid4().hex[:6]}"
    settings_for_queue = settings.model_copy(update={"temporal_task_queue": queue})
    with ThreadPoolExecutor(4) as executor:
        async with build_worker(env_client, settings_for_queue, executor):
            handle = await env_client.start_workflow(
                CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=queue
            )
            await to_match(services)
    # The worker is gone; the case waits durably. A new worker picks it up from history.
    services.offered("r1", "spec-z")
    with ThreadPoolExecutor(4) as executor:
        async with build_worker(env_client, settings_for_queue, executor):
            await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
            services.send(ReviewAccepted(case_id=case_id, review_id="r1", reviewer_id="spec-z"))
            await wait_status(handle, CaseStatus.IN_REVIEW)
            statuses = [t.status for t in await handle.query(CaseWorkflow.timeline) if t.kind == "transition"]
            assert statuses == [
                CaseStatus.AWAITING_RECORDS,
                CaseStatus.MATCHING,
                CaseStatus.AWAITING_ACCEPTANCE,
                CaseStatus.IN_REVIEW,
            ]
            await handle.terminate("test done")
    services.close()


async def test_history_holds_no_phi_in_clear_text(client: Client, settings: Settings) -> None:
    """Payloads go through the encrypting codec: the raw history never shows the patient's name."""
    handle, services = await start(client, settings)
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    raw = Client(client.service_client, namespace=client.namespace)  # no codec: what the server stores
    dump = (await raw.get_workflow_handle(handle.id).fetch_history()).to_json()
    assert "Canary" not in dump and "1980-01-02" not in dump
    assert "YmluYXJ5L2VuY3J5cHRlZA" in dump or "binary/encrypted" in dump
    await handle.terminate("test done")
    services.close()


async def summaries(client: Client, handle: WorkflowHandle) -> list[tuple[str, str]]:
    """The history's timers and local activities as the Temporal UI names them: (event kind, its summary)."""
    kinds = {EventType.EVENT_TYPE_TIMER_STARTED: "timer", EventType.EVENT_TYPE_MARKER_RECORDED: "sent"}
    named = []
    for event in (await handle.fetch_history()).events:
        if event.event_type in kinds and event.user_metadata.HasField("summary"):
            [summary] = await client.data_converter.decode([event.user_metadata.summary])
            named.append((kinds[event.event_type], summary))
    return named


async def test_the_history_names_each_timer_and_what_went_out_for_the_temporal_ui(
    client: Client, settings: Settings
) -> None:
    """Operations read a case's history in the Temporal UI: each timer says what happens when it fires, each
    publish what it sent — in words, without PHI, encrypted like every payload."""
    handle, services = await start(client, settings)
    await services.expect("records.collect")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    named = await summaries(client, handle)
    assert ("sent", "case.status_changed: awaiting_records, then records.collect, insurance.verify") in named
    assert ("timer", "records reminder 1 to the facility") in named
    assert ("timer", "at_risk alert") in named
    raw = (await handle.fetch_history()).to_json()
    assert "records reminder" not in raw and "Canary" not in raw  # kept encrypted in the history

    review_id = f"rev-{uuid.uuid4().hex[:6]}"
    services.insurance_verified(patient_cost="0")
    services.records_assembled()
    await services.expect("review.match")
    services.offered(review_id, "spec-gyn-1")
    await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE)
    for _ in range(50):
        named = await summaries(client, handle)
        if ("timer", "offer to spec-gyn-1 lapses") in named:
            break
        await asyncio.sleep(0.1)
    assert ("timer", "offer to spec-gyn-1 lapses") in named
    assert ("sent", "case.status_changed: awaiting_acceptance") in named
