"""What the run must show at the end, read from the places an auditor would look: Temporal, each service's
database, the dead-letter queues. Poison messages are injected on purpose and must be exactly what the DLQs
hold."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus

from scripts.stack import SERVICES
from services.common.amqp import COMMANDS, QUEUES, Publisher
from services.common.config import Settings
from services.common.dlq import dead_letters
from tests.chaos.driver import DICOM_FILES, ChaosCase
from tests.chaos.webhooks import duplicated_webhooks

# (queue whose DLQ must hold it, routing key, body): malformed, unknown type, data not matching its schema.
POISON = (
    ("insurance", "insurance.verify", b"{not json"),
    ("records", "records.frobnicate", None),
    ("review", "review.match", None),
)


def poison_id(run_id: str, number: int) -> str:
    return f"chaos-poison-{run_id}-{number}"


def inject_poison(settings: Settings, run_id: str) -> dict[str, set[str]]:
    """Publish the poison messages; returns queue -> the ids its DLQ must end up holding."""
    publisher = Publisher(settings)
    expected: dict[str, set[str]] = {}
    try:
        for number, (queue, key, body) in enumerate(POISON):
            message_id = poison_id(run_id, number)
            envelope = {
                "specversion": "1.0",
                "id": message_id,
                "source": "/chaos",
                "type": key,
                "subject": "chaos-poison",
                "time": datetime.now(UTC).isoformat(),
                "data": {"unexpected": True},
            }
            publisher.publish_raw(COMMANDS, key, body or json.dumps(envelope).encode(), message_id)
            expected.setdefault(queue, set()).add(message_id)
    finally:
        publisher.close()
    return expected


@dataclass
class CaseFindings:
    completed: bool = False
    workflow: str = "missing"
    reports: int = 0
    studies: int = 0
    dicom_files: int = 0  # the uploaded images
    stored_reports: int = 0  # the second opinion stored with the study (DICOM Encapsulated PDF, modality DOC)
    coverage: int = 0
    intake_rows: int = 0
    webhook_duplicates: int = 0  # events the partner received under more than one webhook id
    trail: list[str] = field(default_factory=list)  # where an unfinished case stopped, for the report

    @property
    def duplicated(self) -> bool:
        return (
            self.webhook_duplicates > 0
            or self.reports > 1
            or self.studies > 1
            or self.dicom_files > DICOM_FILES
            or self.stored_reports > 1
            or self.coverage > 1
            or self.intake_rows > 1
        )

    @property
    def complete(self) -> bool:
        return self.completed and self.reports == 1 and self.studies == 1 and self.coverage == 1


@dataclass
class Verdict:
    cases: dict[int, CaseFindings]
    running_workflows: int
    dlq_expected: dict[str, set[str]]
    dlq_found: dict[str, set[str]] = field(default_factory=dict)
    webhooks_received: int = 0
    webhooks_undelivered: int = 0
    webhooks_unknown: int = 0

    @property
    def completed(self) -> int:
        return sum(f.complete for f in self.cases.values())

    @property
    def duplicated(self) -> int:
        return sum(f.duplicated for f in self.cases.values())

    @property
    def lost(self) -> int:
        return sum(not f.complete and not f.duplicated for f in self.cases.values())

    @property
    def dlq_ok(self) -> bool:
        names = set(self.dlq_expected) | set(self.dlq_found)
        return all(self.dlq_expected.get(q, set()) == self.dlq_found.get(q, set()) for q in names)


async def trail(client: Client, conn: psycopg.Connection, case_id: str) -> list[str]:
    """Where a case that did not finish stopped: the end of its workflow history, what each service applied
    of the workflow's messages (inbox) and what it has yet to publish (outbox)."""
    events = [e async for e in client.get_workflow_handle(f"case-{case_id}").fetch_history_events()]
    kinds = [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_").lower() for e in events[-8:]]
    lines = [f"history ({len(events)} events) ends: {', '.join(kinds)}"]
    ids = f"case-{case_id}:%"  # the workflow's messages, and the events answering them, carry its id
    for schema in SERVICES:
        applied = conn.execute(
            f"select message_type from {schema}.inbox where message_id like %s order by processed_at",  # noqa: S608
            (ids,),
        ).fetchall()
        pending = conn.execute(
            f"select routing_key from {schema}.outbox where published_at is null and message_id like %s",  # noqa: S608
            (ids,),
        ).fetchall()
        lines.append(
            f"{schema}: applied {[r[0] for r in applied]}, not yet published {[r[0] for r in pending]}"
        )
    reviews = conn.execute("select status from review.reviews where case_id = %s", (case_id,)).fetchall()
    lines.append(f"review rows: {[r[0] for r in reviews]}")
    return lines


def _count(conn: psycopg.Connection, sql: str, value: str) -> int:
    row = conn.execute(sql, (value,)).fetchone()
    return int(row[0]) if row else 0


async def verdict(
    settings: Settings,
    client: Client,
    cases: list[ChaosCase],
    expected_dlq: dict[str, set[str]],
    received: Counter[str],
) -> Verdict:
    findings: dict[int, CaseFindings] = {}
    assert settings.database_url
    duplicates, undelivered, unknown = duplicated_webhooks(settings.database_url, received)
    with psycopg.connect(settings.database_url) as conn:
        for case in cases:
            found = CaseFindings()
            found.intake_rows = _count(
                conn, "select count(*) from intake.cases where partner_case_ref = %s", case.ref
            )
            if case.case_id is not None:
                description = await client.get_workflow_handle(f"case-{case.case_id}").describe()
                found.workflow = description.status.name if description.status else "unknown"
                found.completed = description.status == WorkflowExecutionStatus.COMPLETED
                cid = case.case_id
                found.webhook_duplicates = duplicates.get(cid, 0)
                found.reports = _count(conn, "select count(*) from review.reports where case_id = %s", cid)
                found.studies = _count(
                    conn,
                    "select count(distinct study_instance_uid) from records.record_files"
                    " where case_id = %s and kind = 'dicom'",
                    cid,
                )
                found.dicom_files = _count(
                    conn,
                    "select count(*) from records.record_files where case_id = %s and kind = 'dicom'"
                    " and coalesce(modality, '') <> 'DOC'",
                    cid,
                )
                found.stored_reports = _count(
                    conn,
                    "select count(*) from records.record_files where case_id = %s and modality = 'DOC'",
                    cid,
                )
                found.coverage = _count(
                    conn, "select count(*) from insurance.coverage_verifications where case_id = %s", cid
                )
                if not found.complete:
                    found.trail = await trail(client, conn, cid)
            findings[case.number] = found
    running = 0
    async for _ in client.list_workflows('ExecutionStatus = "Running"'):
        running += 1
    found_dlq = {q: {d.id for d in dead_letters(settings, q)} for q in QUEUES}
    return Verdict(
        findings,
        running,
        expected_dlq,
        {q: ids for q, ids in found_dlq.items() if ids},
        webhooks_received=sum(received.values()),
        webhooks_undelivered=undelivered,
        webhooks_unknown=unknown,
    )
