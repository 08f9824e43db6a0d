"""What the records commands and events do. Handlers write their effects and outbox rows; the caller commits."""

from __future__ import annotations

import pydicom
import structlog
from sqlmodel import Session, col, select

from contracts.commands import CollectRecords, ReconcileIdentity, RemindRecords
from contracts.envelope import new_event
from contracts.events import CaseCancelled, RecordsNeeded
from services.auth import tenancy
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.db import after_commit, engine_of, get_engine, transaction_lock, utcnow
from services.common.errors import PoisonMessage
from services.records import report_return
from services.records.adequacy import assess
from services.records.assembly import SOURCE, assemble_if_complete
from services.records.models import (
    ImportStatus,
    RecordFile,
    RecordImport,
    RecordRequest,
    RecordRetrieval,
    ReportReturn,
)
from services.records.polled import cancel_open
from services.records.report_study import REPORT_SOURCE
from services.records.retrieval import plan_retrieval
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)

DECISIONS = ("accept", "reject")
# An object in the store and the rows that refer to it change together under a transaction-scoped PostgreSQL
# advisory lock on its content, in this key space (two-key form): shared while an upload keeps it and commits its
# row, exclusive while a removal checks that no row refers to it and removes it. One lock per first hex digit of
# the content's hash, so an import of thousands of instances holds at most 16 locks (the lock table is small).
CONTENT_LOCKS = 0x5EC0_0B1E


def lock_request(session: Session, case_id: str) -> RecordRequest | None:
    """The case's records request, locked so uploads and commands for one case apply one at a time."""
    query = select(RecordRequest).where(RecordRequest.case_id == case_id).with_for_update()
    return session.exec(query).first()


def collect(cmd: CollectRecords, session: Session, settings: Settings) -> None:
    """Open (or refresh) the case's records request; uploads are accepted from now on."""
    tenancy.register_owner(get_engine("auth"), cmd.case_id, cmd.partner_id, cmd.patient.mrn)
    patient = cmd.patient.model_dump(mode="json")
    exam = cmd.exam.model_dump(mode="json")
    request = lock_request(session, cmd.case_id)
    if request is None:
        request = RecordRequest(case_id=cmd.case_id, patient=patient, exam=exam, partner_id=cmd.partner_id)
        log.info("records.requested", case_id=cmd.case_id)
    elif request.cancelled_at is not None:
        log.info("records.collect_after_cancel_ignored", case_id=cmd.case_id)
        return
    else:
        request.patient, request.exam = patient, exam
        request.partner_id = cmd.partner_id or request.partner_id
    session.add(request)
    session.flush()
    plan_retrieval(session, request)
    assemble_if_complete(session, request, ObjectStore.for_settings(settings))


def cancel(event: CaseCancelled, session: Session) -> None:
    """Withdraw: close the request so no upload or retrieval continues; a second cancel changes nothing."""
    request = lock_request(session, event.case_id)
    if request is None or request.cancelled_at is not None:
        return
    request.cancelled_at = utcnow()
    session.add(request)
    cancel_open(session, RecordRetrieval, event.case_id)
    cancel_open(session, ReportReturn, event.case_id)
    log.info("records.request_cancelled", case_id=event.case_id)


def remind(cmd: RemindRecords, session: Session) -> None:
    """Record the reminder and publish `records.needed` with what is still missing (once per attempt)."""
    request = lock_request(session, cmd.case_id)
    if request is None:
        raise PoisonMessage("records.remind for a case whose records were never requested")
    if request.assembled_at is not None or request.cancelled_at is not None:
        return
    if cmd.attempt > request.reminders_sent:
        request.reminders_sent = cmd.attempt
        request.last_reminded_at = utcnow()
        session.add(request)
    files = session.exec(
        select(RecordFile).where(RecordFile.case_id == cmd.case_id, col(RecordFile.released).is_(True))
    ).all()
    needed = RecordsNeeded(
        case_id=cmd.case_id, attempt=cmd.attempt, missing=assess(files, request.exam).missing
    )
    enqueue(
        session,
        EVENTS,
        new_event(
            id=f"records.needed:{cmd.case_id}:{cmd.attempt}", source=SOURCE, subject=cmd.case_id, data=needed
        ),
    )
    log.info("records.reminder_recorded", case_id=cmd.case_id, attempt=cmd.attempt)


def reconcile(cmd: ReconcileIdentity, session: Session, settings: Settings) -> None:
    """A human's decision on an import held for identity: accept releases it, reject discards it."""
    if cmd.decision not in DECISIONS:
        raise PoisonMessage(f"records.reconcile decision must be one of {DECISIONS}")
    request = lock_request(session, cmd.case_id)
    held = session.get(RecordImport, cmd.import_id)
    if request is None or held is None or held.case_id != cmd.case_id:
        raise PoisonMessage("records.reconcile names an import this case does not have")
    if held.status != ImportStatus.IDENTITY_MISMATCH:
        return  # already decided: a redelivered or repeated decision changes nothing
    held.decided_at, held.decided_by = utcnow(), cmd.decided_by[:200]
    files = list(session.exec(select(RecordFile).where(RecordFile.import_id == held.import_id)).all())
    store = ObjectStore.for_settings(settings)
    if cmd.decision == "accept":
        held.status = ImportStatus.RELEASED
        for row in files:
            row.released = True
            session.add(row)
        if held.source == REPORT_SOURCE and request.partner_id:
            _return_released_reports(session, store, request.partner_id, files)
    else:
        held.status = ImportStatus.REJECTED
        for row in files:
            session.delete(row)
        session.flush()
        for row in files:
            remove_if_unreferenced(session, store, row.storage_path, row.sha256)
    session.add(held)
    session.flush()
    log.info("records.import_decided", case_id=cmd.case_id, import_id=held.import_id, decision=cmd.decision)
    if request.cancelled_at is None:
        assemble_if_complete(session, request, store)


def _return_released_reports(
    session: Session, store: ObjectStore, partner_id: str, files: list[RecordFile]
) -> None:
    """A second-opinion report held for its identity, now accepted, goes back to the PACS like any other
    (if the partner's source asks); its version is its Instance Number, as the review service writes it."""
    for row in files:
        if not row.sop_instance_uid:
            continue
        header = pydicom.dcmread(
            store.local_path(row.storage_path, row.sha256),
            stop_before_pixels=True,
            specific_tags=["InstanceNumber"],
        )
        report_return.plan_return(
            session,
            case_id=row.case_id,
            partner_id=partner_id,
            sop_instance_uid=row.sop_instance_uid,
            sha256=row.sha256,
            version=int(header.get("InstanceNumber") or 1),
        )


def remove_if_unreferenced(session: Session, store: ObjectStore, storage_path: str, sha256: str) -> None:
    """Remove the stored object once the session's transaction has committed, if no file refers to it then.
    Content is stored once for every case that has it; only the last reference removes the object. Never
    before the commit: a transaction rolled back (a consumer's batch that broke, a crash) keeps its rows, and
    their object must still be there when the message is applied again."""
    engine = engine_of(session)

    def remove() -> None:
        with Session(engine) as fresh:
            _lock_content(fresh, sha256, shared=False)
            still_used = fresh.exec(
                select(RecordFile.id).where(RecordFile.storage_path == storage_path)
            ).first()
            if still_used is None:
                store.remove(storage_path, sha256)

    after_commit(session, remove)


def hold_content(session: Session, sha256: str) -> None:
    """Keep the object with this content from being removed until the session's transaction ends: an upload
    holds it from keeping the object until its row referring to it is committed (or rolled back)."""
    _lock_content(session, sha256, shared=True)


def _lock_content(session: Session, sha256: str, *, shared: bool) -> None:
    # SQLite runs one process on a laptop: not guarded there.
    transaction_lock(session, CONTENT_LOCKS, int(sha256[0], 16), shared=shared)
