"""The case workflow on a real Temporal dev server, wired through the real broker by its activities and
the event bridge. The test answers each command the way the services would."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pika
import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes

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
    ReviewAssigned,
    ReviewSubmitted,
    StudySummary,
    Urgency,
    new_event,
)
from services.common.amqp import COMMANDS, EVENTS, Publisher, ensure_topology
from services.common.config import Settings
from services.common.temporal import ASSIGNED_REVIEWER, CASE_STATUS, CASE_URGENCY, PARTNER_ID
from workflows.bridge import EventBridge
from workflows.case import CaseWorkflow
from workflows.worker import build_worker

TASK_QUEUE = "cases"


@pytest.fixture(scope="module")
async def running_worker(temporal_env, settings: Settings) -> AsyncIterator[Client]:  # type: ignore[no-untyped-def]
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


def command_reader(settings: Settings) -> tuple[pika.BlockingConnection, str]:
    """A private queue that sees every command, so the test can act as the services."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, COMMANDS, routing_key="#")
    return conn, queue


async def next_command(conn: pika.BlockingConnection, queue: str, type_: str, timeout: float = 20) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    channel = conn.channel()
    while asyncio.get_running_loop().time() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            await asyncio.sleep(0.1)
            continue
        if props.type == type_:
            import json

            return json.loads(body)
    raise AssertionError(f"no {type_} command within {timeout}s")


def case_input(case_id: str) -> CaseInput:
    return CaseInput(
        case_id=case_id,
        partner_id="partner-a",
        urgency=Urgency.PRIORITY,
        subspecialty_hint="gynecologic_imaging",
        due_at=datetime.now(UTC) + timedelta(days=2),
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


def publish(settings: Settings, event_id: str, data) -> None:  # type: ignore[no-untyped-def]
    publisher = Publisher(settings)
    try:
        publisher.publish(EVENTS, new_event(id=event_id, source="/test", subject=data.case_id, data=data))
    finally:
        publisher.close()


async def wait_status(handle, status: CaseStatus, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout * 10)):
        if await handle.query(CaseWorkflow.status) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"case never reached {status}; it is {await handle.query(CaseWorkflow.status)}")


async def test_case_runs_from_request_to_closed_and_drops_duplicate_events(
    running_worker: Client, settings: Settings
) -> None:
    client = running_worker
    case_id = str(uuid.uuid4())
    conn, queue = command_reader(settings)
    handle = await client.start_workflow(
        CaseWorkflow.run,
        case_input(case_id),
        id=f"case-{case_id}",
        task_queue=TASK_QUEUE,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(CASE_STATUS, "intake"),
                SearchAttributePair(CASE_URGENCY, "priority"),
                SearchAttributePair(PARTNER_ID, "partner-a"),
            ]
        ),
    )
    collect = await next_command(conn, queue, "records.collect")
    assert collect["subject"] == case_id and collect["data"]["exam"]["exam_type"] == "pelvic"
    await next_command(conn, queue, "insurance.verify")
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)

    publish(
        settings,
        "ins-1",
        InsuranceVerified(
            case_id=case_id,
            coverage_status=CoverageStatus.COVERED,
            plan_code="ACME-PPO",
            cpt="76140",
            allowed_amount=Decimal("300.00"),
            patient_cost=Decimal("85.00"),
            explanation="copay",
        ),
    )
    study = StudySummary(
        study_instance_uid="1.2.3", modality="US", instance_count=2, multiframe_count=1, series_count=1
    )
    report = OriginalReport(content_type="text/plain", sha256="ab" * 32, text="complex cyst")
    publish(settings, "rec-1", RecordsAssembled(case_id=case_id, report=report, study=study, file_count=3))
    match = await next_command(conn, queue, "review.match")
    assert match["data"]["original_report"]["text"] == "complex cyst"

    assigned = ReviewAssigned(
        case_id=case_id,
        review_id="r1",
        reviewer_id="spec-gyn-1",
        subspecialty="gynecologic_imaging",
        explanation="x",
    )
    publish(settings, "rev-1", assigned)
    await wait_status(handle, CaseStatus.IN_REVIEW)

    submitted = ReviewSubmitted(
        case_id=case_id, review_id="r1", reviewer_id="spec-gyn-1", agreement="concordant"
    )
    publish(settings, "sub-1", submitted)
    compose = await next_command(conn, queue, "report.compose")
    assert compose["data"]["review_id"] == "r1"
    # A late duplicate of an earlier event changes nothing.
    publish(settings, "rev-1", assigned)

    publish(
        settings,
        "rep-1",
        ReportReady(
            case_id=case_id,
            report_id="rp1",
            pdf_url="http://x/pdf",
            fhir_url="http://x/fhir",
            sha256="0" * 64,
        ),
    )
    deliver = await next_command(conn, queue, "report.deliver")
    assert deliver["data"]["report_id"] == "rp1"
    publish(
        settings,
        "del-1",
        ReportDelivered(
            case_id=case_id, report_id="rp1", recipient="NPI 1234567893", delivered_at=datetime.now(UTC)
        ),
    )
    outcome = await asyncio.wait_for(handle.result(), timeout=30)
    conn.close()

    assert outcome.status == CaseStatus.CLOSED
    assert outcome.reviewer_id == "spec-gyn-1"
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(CASE_STATUS) == "closed"
    assert description.typed_search_attributes.get(ASSIGNED_REVIEWER) == "spec-gyn-1"
    statuses = [t.status for t in await handle.query(CaseWorkflow.timeline)]
    assert statuses == [
        CaseStatus.AWAITING_RECORDS,
        CaseStatus.MATCHING,
        CaseStatus.IN_REVIEW,
        CaseStatus.COMPOSING_REPORT,
        CaseStatus.DELIVERING,
        CaseStatus.DELIVERED,
        CaseStatus.CLOSED,
    ]


async def test_history_holds_no_phi_in_clear_text(running_worker: Client, settings: Settings) -> None:
    """Payloads go through the encrypting codec: the raw history never shows the patient's name."""
    client = running_worker
    case_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=TASK_QUEUE
    )
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)
    raw = Client(client.service_client, namespace=client.namespace)  # no codec: what the server stores
    history = await raw.get_workflow_handle(handle.id).fetch_history()
    dump = history.to_json()
    assert "Canary" not in dump and "1980-01-02" not in dump
    assert "binary/encrypted" in dump or "YmluYXJ5L2VuY3J5cHRlZA" in dump
    await handle.terminate("test done")
