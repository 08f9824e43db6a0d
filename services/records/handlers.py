"""What the records commands do. Handlers write their effects and outbox rows; the caller commits."""

from __future__ import annotations

import structlog
from sqlmodel import Session, select

from contracts.commands import CollectRecords
from services.common.config import Settings
from services.records.assembly import assemble_if_complete
from services.records.models import RecordRequest
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)


def lock_request(session: Session, case_id: str) -> RecordRequest | None:
    """The case's records request, locked so uploads and commands for one case apply one at a time."""
    query = select(RecordRequest).where(RecordRequest.case_id == case_id).with_for_update()
    return session.exec(query).first()


def collect(cmd: CollectRecords, session: Session, settings: Settings) -> None:
    """Open (or refresh) the case's records request; uploads are accepted from now on."""
    patient = cmd.patient.model_dump(mode="json")
    exam = cmd.exam.model_dump(mode="json")
    request = lock_request(session, cmd.case_id)
    if request is None:
        request = RecordRequest(case_id=cmd.case_id, patient=patient, exam=exam)
        log.info("records.requested", case_id=cmd.case_id)
    else:
        request.patient, request.exam = patient, exam
    session.add(request)
    session.flush()
    assemble_if_complete(session, request, ObjectStore.for_settings(settings))
