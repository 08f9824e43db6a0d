"""The second opinion stored with the study it reads: the review service's DICOM Encapsulated PDF is imported
like any instance (validated, content-addressed), so the report sits in the study for DICOMweb clients and
viewers beside the original images. It takes the study's identity from those images first (report_study.py);
without any released image it is reconciled with the case's patient like an upload. Where the partner's
source asks for it, the report is then queued to go back into the facility's PACS (`report_return`), as
stored: with the study's identity as the facility's images have it.

A report that comes while the case's images wait for a person's identity decision, and that no released image
can place, is kept aside (`awaiting_placement`: not handed out, not sent) and placed once the decision is
made (`place_waiting_reports`). So the one copy records stores is the one it hands out (WADO-RS, downloads,
the review service's DICOM download) and sends back, under one SOP Instance UID with one patient and
study (its identifiers those of the domain each copy goes to, reconcile.py)."""

from __future__ import annotations

import base64
import binascii
import io

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from sqlalchemy import delete
from sqlmodel import Session, col, select

from contracts.events import EncapsulatedReport
from services.common.config import Settings
from services.common.errors import PoisonMessage
from services.records import handlers, report_return, uploads
from services.records.archive import Entry
from services.records.models import (
    ImportStatus,
    RecordFile,
    RecordImport,
    RecordRequest,
    ReportReturn,
    RetrievalStatus,
)
from services.records.report_study import REPORT_SOURCE, images_held, place_in_study
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)


def store_report(event: EncapsulatedReport, session: Session, settings: Settings) -> None:
    """Import the report into the case's records; a redelivered event stores nothing new (same bytes)."""
    try:
        dicom = base64.b64decode(event.dicom_base64, validate=True)
    except binascii.Error as exc:
        raise PoisonMessage("document.encapsulated_report carries no valid base64 DICOM") from exc
    try:
        stored, placed = _file_report(dicom, event.case_id, event.version, session, settings)
    except (uploads.RecordsNotRequested, uploads.RecordsCancelled):
        log.info("records.report_not_stored", case_id=event.case_id, reason="no open records request")
        return
    log.info(
        "records.report_stored",
        case_id=event.case_id,
        report_id=event.report_id,
        version=event.version,
        identity_from_images=placed,
        released=stored.released,
    )


def place_waiting_reports(case_id: str, session: Session, settings: Settings) -> None:
    """After an identity decision: the reports kept aside meanwhile are placed into the study of the images
    now released (or, every image rejected, reconciled with the case's patient like an upload) and stored as
    placed, in the caller's transaction; their copy kept aside, never handed out, is dropped. Nothing happens
    while images of the case still wait for a decision, or once the case is cancelled."""
    request = session.get(RecordRequest, case_id)
    if request is None or request.cancelled_at is not None or images_held(session, case_id):
        return
    waiting = session.exec(
        select(RecordImport).where(
            RecordImport.case_id == case_id,
            RecordImport.source == REPORT_SOURCE,
            RecordImport.status == ImportStatus.AWAITING_PLACEMENT,
        )
    ).all()
    store = ObjectStore.for_settings(settings)
    for record_import in waiting:
        kept = session.exec(select(RecordFile).where(RecordFile.import_id == record_import.import_id)).all()
        for row in kept:
            dicom = store.local_path(row.storage_path, row.sha256).read_bytes()
            header = pydicom.dcmread(
                io.BytesIO(dicom), stop_before_pixels=True, specific_tags=["InstanceNumber"]
            )
            # Not sent yet (the send waited for the decision): queued again below with the copy placed.
            session.execute(
                delete(ReportReturn).where(
                    col(ReportReturn.case_id) == case_id,
                    col(ReportReturn.sha256) == row.sha256,
                    col(ReportReturn.status) == RetrievalStatus.PENDING,
                )
            )
            session.delete(row)
            session.flush()
            stored, placed = _file_report(
                dicom, case_id, int(header.get("InstanceNumber") or 1), session, settings
            )
            handlers.remove_if_unreferenced(session, store, row.storage_path, row.sha256)
            log.info(
                "records.report_placed",
                case_id=case_id,
                sop_instance_uid=stored.sop_instance_uid,
                identity_from_images=placed,
                released=stored.released,
            )
        session.delete(record_import)
    session.flush()


def place_report_left_unplaced(record_import: RecordImport, session: Session, settings: Settings) -> bool:
    """A report the version before last stored unplaced while the case's images were held
    (`report_study.stored_unplaced_while_held`), the decision made since: kept aside as this version would
    have kept it, then placed like the reports kept aside (its unsent return queued again, for the copy
    placed), in the caller's transaction. False (nothing done) once the case is cancelled."""
    request = session.get(RecordRequest, record_import.case_id)
    if request is None or request.cancelled_at is not None:
        return False
    record_import.status = ImportStatus.AWAITING_PLACEMENT
    session.add(record_import)
    for row in session.exec(select(RecordFile).where(RecordFile.import_id == record_import.import_id)).all():
        row.released = False
        session.add(row)
    session.flush()
    place_waiting_reports(record_import.case_id, session, settings)
    return True


def _file_report(
    dicom: bytes, case_id: str, version: int, session: Session, settings: Settings
) -> tuple[RecordFile, bool]:
    """Store the report placed into its study (or kept aside while it cannot be yet) and queue it for the
    facility's PACS; returns the stored row and whether it took the identity of the images."""
    # The case locked before its images are read: an identity decision applied meanwhile by another process
    # would release them after we read them held, and this report would wait aside for a decision already made.
    handlers.lock_request(session, case_id)
    store = ObjectStore.for_settings(settings)
    try:
        placed = place_in_study(dicom, case_id, session, store)
    except InvalidDicomError:
        placed = None  # the import below refuses it, saying why
    # The images that would give it its identity wait for a person: until then it has no identity to show.
    awaiting = placed is None and images_held(session, case_id)
    received = store.receive(
        io.BytesIO(placed or dicom), position=1, total=1, limit=settings.max_upload_bytes
    )
    entry = Entry(received, None, "the second-opinion report", declared_type="application/dicom")
    outcome = uploads.accept_entries(
        case_id,
        [entry],
        session,
        settings,
        source=REPORT_SOURCE,
        in_transaction=True,
        identity_reconciled=placed is not None,
        awaiting_placement=awaiting,
    )
    [stored] = outcome.files  # as stored (placed in another study, it is another instance)
    # Back into the facility's PACS, if its source asks: a report released to the case, or one kept aside
    # (queued, so the queue shows it waits for the decision). One held for an identity mismatch of its own
    # waits for that reconciliation. A redelivered event queues nothing new.
    partner_id = outcome.request.partner_id
    if partner_id and stored.sop_instance_uid and (stored.released or awaiting):
        report_return.plan_return(
            session,
            case_id=case_id,
            partner_id=partner_id,
            sop_instance_uid=stored.sop_instance_uid,
            sha256=stored.sha256,
            version=version,
        )
    return stored, placed is not None
