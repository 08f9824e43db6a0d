"""What intake does: create a case, start its workflow, mirror its status, deliver its report."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import structlog
from sqlmodel import Session, col, select
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from contracts.commands import DeliverReport
from contracts.envelope import CloudEvent, new_event
from contracts.events import CaseAlert, CaseCancelled, CaseStatusChanged, ReportDelivered
from contracts.models import CaseInput, CaseStatus, Urgency
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.errors import PoisonMessage
from services.common.temporal import CASE_DUE_AT, CASE_STATUS, CASE_URGENCY, PARTNER_ID, SUBSPECIALTY
from services.intake import hl7_out, webhooks_out
from services.intake.models import Case, CaseCreate, CaseTimelineEntry, ReportAmended
from services.intake.order_reference import ReferenceSearch
from services.intake.triage import triage

log = structlog.get_logger(__name__)

SOURCE = "/services/intake"


# partner_case_ref_system of a reference stored before systems were kept (intake migration 0006): unknown.
UNKNOWN_SYSTEM = "*"


LOCKED_CASES = "intake.locked_cases"  # session.info: (the transaction, the case ids it holds locked)


def workflow_id(case_id: str) -> str:
    return f"case-{case_id}"


def existing_case(
    reference: str | None, system: str | None, partner_id: str, session: Session
) -> Case | None:
    """The partner's case with this `partner_case_ref` under this system (None: sent without one), if any;
    a reference stored before systems were kept (UNKNOWN_SYSTEM) answers its value under any system."""
    if not reference:
        return None
    return session.exec(
        select(Case)
        .where(
            Case.partner_id == partner_id,
            Case.partner_case_ref == reference,
            col(Case.partner_case_ref_system).in_([system or "", UNKNOWN_SYSTEM]),
        )
        .order_by(col(Case.partner_case_ref_system) == UNKNOWN_SYSTEM)  # the exact one first
    ).first()


_legacy_partners: frozenset[str] | None = None  # partners with references of unknown system (read once)


def legacy_case(reference: str | None, partner_id: str, session: Session) -> Case | None:
    """The partner's case whose reference `reference` was stored before systems were kept, if any. Only
    migration 0006 writes such references, so which partners have any is read once per process."""
    global _legacy_partners
    if not reference:
        return None
    if _legacy_partners is None:
        query = select(Case.partner_id).where(Case.partner_case_ref_system == UNKNOWN_SYSTEM).distinct()
        _legacy_partners = frozenset(session.exec(query).all())
    if partner_id not in _legacy_partners:
        return None
    return session.exec(
        select(Case).where(
            Case.partner_id == partner_id,
            Case.partner_case_ref == reference,
            Case.partner_case_ref_system == UNKNOWN_SYSTEM,
        )
    ).first()


def forget_legacy_partners() -> None:
    """Read again which partners have references of unknown system (tests that write them)."""
    global _legacy_partners
    _legacy_partners = None


def cases_found(search: ReferenceSearch, partner_id: str, session: Session, limit: int = 2) -> list[Case]:
    """The partner's cases an `identifier` search names (FHIR token search), at most `limit` of them."""
    query = select(Case).where(Case.partner_id == partner_id, Case.partner_case_ref == search.value)
    if not search.any_system:
        query = query.where(col(Case.partner_case_ref_system).in_([search.system or "", UNKNOWN_SYSTEM]))
    return list(session.exec(query.order_by(col(Case.created_at)).limit(limit)).all())


def reference_system(case: Case) -> str | None:
    """The system of the case's partner reference; None when it was sent without one (or not kept)."""
    system = case.partner_case_ref_system
    return None if system in ("", UNKNOWN_SYSTEM) else system


def new_case(request: CaseCreate, partner_id: str, session: Session, now: datetime | None = None) -> Case:
    """Add a new case of `partner_id` and its first timeline entry to the session (the caller commits; a
    repeated `partner_case_ref` then fails the commit on the unique constraint)."""
    now = now or datetime.now(UTC)
    decided = triage(
        exam_type=request.exam.exam_type,
        reason=request.reason,
        procedure_scheduled_on=request.procedure_scheduled_on,
        gestational_age_weeks=request.gestational_age_weeks,
        now=now,
    )
    case = Case(
        id=str(uuid.uuid4()),
        partner_id=partner_id,
        partner_case_ref=request.partner_case_ref,
        partner_case_ref_system=request.partner_case_ref_system or "",
        urgency=decided.urgency,
        subspecialty=decided.subspecialty,
        due_at=decided.due_at,
        request_json=request.model_dump_json(),
        consent_on_file=request.consent_on_file,
        created_at=now,
        updated_at=now,
    )
    session.add(case)
    session.add(
        CaseTimelineEntry(
            case_id=case.id,
            event_id=f"intake:{case.id}",
            status=CaseStatus.INTAKE,
            detail="request received",
            at=now,
        )
    )
    return case


def case_input(case: Case) -> CaseInput:
    request = CaseCreate.model_validate_json(case.request_json)
    return CaseInput(
        case_id=case.id,
        partner_id=case.partner_id,
        urgency=Urgency(case.urgency),
        subspecialty_hint=case.subspecialty,
        due_at=case.due_at,
        patient=request.patient,
        referring=request.referring,
        exam=request.exam,
        clinical_question=request.clinical_question,
        reason=request.reason,
        coverage=request.coverage,
        consent_on_file=case.consent_on_file,
        partner_case_ref=case.partner_case_ref,
        partner_case_ref_system=reference_system(case),
        procedure_scheduled_on=request.procedure_scheduled_on,
        gestational_age_weeks=request.gestational_age_weeks,
    )


async def start_workflow(client: Client, case: Case, settings: Settings) -> None:
    """Start `case-{id}`; a workflow that already exists counts as started (the start is idempotent)."""
    attributes = TypedSearchAttributes(
        [
            SearchAttributePair(CASE_STATUS, CaseStatus.INTAKE.value),
            SearchAttributePair(CASE_URGENCY, case.urgency),
            SearchAttributePair(SUBSPECIALTY, case.subspecialty),
            SearchAttributePair(PARTNER_ID, case.partner_id),
            SearchAttributePair(CASE_DUE_AT, case.due_at),
        ]
    )
    arguments = case_input(case)
    try:
        await client.start_workflow(
            "CaseWorkflow",
            arguments,
            id=workflow_id(case.id),
            task_queue=settings.temporal_task_queue,
            search_attributes=attributes,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"Second opinion · {arguments.exam.exam_type} ultrasound · {case.urgency}",
        )
    except WorkflowAlreadyStartedError:
        log.info("workflow.already_started", case_id=case.id)


def locked_case(session: Session, case_id: str) -> Case | None:
    """The case, locked until the transaction ends: intake's replicas apply one case's events one at a time, so
    a change read before another committed never overwrites it. Locked once per transaction: a batch's later
    messages for the case read the session's own copy."""
    transaction = session.get_transaction()
    held: tuple[object, set[str]] | None = session.info.get(LOCKED_CASES)
    if held is None or held[0] is not transaction:
        held = session.info[LOCKED_CASES] = (transaction, set())
    if case_id in held[1]:
        return session.get(Case, case_id)
    # Read again as committed now: a copy loaded unlocked earlier in the transaction may be out of date.
    # FOR NO KEY UPDATE, as an UPDATE locks: rows added under the case (timeline, documents) do not wait.
    case = session.get(Case, case_id, with_for_update={"key_share": True}, populate_existing=True)
    if case is not None:
        held[1].add(case_id)
    return case


def record_status(event: CloudEvent, change: CaseStatusChanged, session: Session) -> None:
    case = locked_case(session, change.case_id)
    if case is None:
        log.warning("status.unknown_case", case_id=change.case_id)
        return
    session.add(
        CaseTimelineEntry(
            case_id=case.id, event_id=event.id, status=change.status, detail=change.detail, at=change.at
        )
    )
    if _later(change, case):
        case.status = change.status
        case.status_seq = change.seq if change.seq is not None else case.status_seq
        case.updated_at = change.at
    session.add(case)


def _later(change: CaseStatusChanged, case: Case) -> bool:
    """Whether `change` is later than the status the case shows. The workflow numbers its status changes
    (`seq`): two made in one workflow task (a hold and a resume) carry one `at`, and the broker or two replicas
    may apply them in either order. Changes without a number (a worker from before, or queued at the upgrade)
    are ordered by time, as they were. A cancelled case stays cancelled."""
    if case.status == CaseStatus.CANCELLED:
        return False
    if change.seq is not None and case.status_seq is not None:
        return change.seq > case.status_seq
    return change.at >= _aware(case.updated_at) or case.status == CaseStatus.INTAKE


def record_cancellation(event: CloudEvent, cancelled: CaseCancelled, session: Session) -> None:
    """Mark the case cancelled (idempotent: a second delivery changes nothing)."""
    case = locked_case(session, cancelled.case_id)
    if case is None or case.status == CaseStatus.CANCELLED:
        return
    now = datetime.now(UTC)
    case.status = CaseStatus.CANCELLED
    case.updated_at = now
    session.add(case)
    session.add(
        CaseTimelineEntry(
            case_id=case.id, event_id=event.id, status=CaseStatus.CANCELLED, detail="case cancelled", at=now
        )
    )


def record_alert(event: CloudEvent, alert: CaseAlert, session: Session) -> None:
    """Show an alert on the case's timeline; a moved due date is mirrored on the case, never silently."""
    case = locked_case(session, alert.case_id)
    if case is None:
        log.warning("alert.unknown_case", case_id=alert.case_id, kind=alert.kind)
        return
    if alert.kind == "due_date_moved" and alert.due_at is not None:
        case.due_at = alert.due_at
        session.add(case)
    session.add(
        CaseTimelineEntry(
            case_id=case.id,
            event_id=event.id,
            status=case.status,
            detail=f"{alert.kind}: {alert.detail}",
            at=alert.at,
            kind="alert",
        )
    )


def deliver_report(event: CloudEvent, cmd: DeliverReport, session: Session) -> None:
    """Make the report available to the referring physician through the case API and record the delivery."""
    case = locked_case(session, cmd.case_id)
    if case is None:
        # Intake stores a case before its workflow starts: a report for a case it lacks never will be.
        raise PoisonMessage(f"report.deliver names case {cmd.case_id}, which intake does not have")
    now = datetime.now(UTC)
    amended: ReportAmended | None = None
    if case.delivered_at is None:
        case.report_pdf_url = cmd.pdf_url
        case.report_fhir_url = cmd.fhir_url
        case.delivered_at = now
        case.updated_at = now
        session.add(case)
    else:
        # A later delivery is a new version of the delivered report (an answer to a question, or the
        # specialist's own addendum): the partner's system is told to fetch it again.
        amended = ReportAmended(
            case_id=case.id, report_id=cmd.report_id, pdf_url=cmd.pdf_url, fhir_url=cmd.fhir_url
        )
        webhooks_out.fan_out(
            session, new_event(id=f"{event.id}>report.amended", source=SOURCE, subject=case.id, data=amended)
        )
    # The partner's HL7 interface engines get the report as an ORU^R01: F first, C for each later version.
    hl7_out.queue(
        session,
        case,
        event.id,
        report_id=cmd.report_id,
        pdf_url=cmd.pdf_url,
        fhir_url=cmd.fhir_url,
        amended=amended is not None,
    )
    referring = CaseCreate.model_validate_json(case.request_json).referring
    enqueue(
        session,
        EVENTS,
        new_event(
            id=f"{event.id}>report.delivered",
            source=SOURCE,
            subject=case.id,
            data=ReportDelivered(
                case_id=case.id,
                report_id=cmd.report_id,
                # Said as it happened: the report is posted to the partner's system (case API, report.ready
                # webhook) for the referring physician, not handed to the physician.
                recipient=f"partner {case.partner_id}, for the referring physician (NPI {referring.npi})",
                delivered_at=case.delivered_at or now,
            ),
        ),
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
