"""The second opinion stored with the study it reads: the review service's DICOM Encapsulated PDF is imported
like any instance (validated, content-addressed), so the report sits in the study for DICOMweb clients and
viewers beside the original images. It takes the study's identity from those images first (report_study.py);
without any released image it is reconciled with the case's patient like an upload. Where the partner's
source asks for it, the report is then queued to go back into the facility's PACS (`report_return`), as
stored: with the study's identity as the facility's images have it."""

from __future__ import annotations

import base64
import binascii
import io

import structlog
from pydicom.errors import InvalidDicomError
from sqlmodel import Session

from contracts.events import EncapsulatedReport
from services.common.config import Settings
from services.common.errors import PoisonMessage
from services.records import report_return, uploads
from services.records.archive import Entry
from services.records.report_study import REPORT_SOURCE, place_in_study
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)


def store_report(event: EncapsulatedReport, session: Session, settings: Settings) -> None:
    """Import the report into the case's records; a redelivered event stores nothing new (same bytes)."""
    try:
        dicom = base64.b64decode(event.dicom_base64, validate=True)
    except binascii.Error as exc:
        raise PoisonMessage("document.encapsulated_report carries no valid base64 DICOM") from exc
    store = ObjectStore.for_settings(settings)
    try:
        placed = place_in_study(dicom, event.case_id, session, store)
    except InvalidDicomError:
        placed = None  # the import below refuses it, saying why
    received = store.receive(
        io.BytesIO(placed or dicom), position=1, total=1, limit=settings.max_upload_bytes
    )
    entry = Entry(received, None, "the second-opinion report", declared_type="application/dicom")
    try:
        outcome = uploads.accept_entries(
            event.case_id,
            [entry],
            session,
            settings,
            source=REPORT_SOURCE,
            in_transaction=True,
            identity_reconciled=placed is not None,
        )
    except (uploads.RecordsNotRequested, uploads.RecordsCancelled):
        log.info("records.report_not_stored", case_id=event.case_id, reason="no open records request")
        return
    # Back into the facility's PACS, if its source asks; only a report released to the case (one held for an
    # identity mismatch waits for the reconciliation). A redelivered event queues nothing new.
    partner_id = outcome.request.partner_id
    if partner_id and all(f.released for f in outcome.files):
        [stored] = outcome.files  # as stored (placed in another study, it is another instance)
        report_return.plan_return(
            session,
            case_id=event.case_id,
            partner_id=partner_id,
            sop_instance_uid=stored.sop_instance_uid or event.sop_instance_uid,
            sha256=received.sha256,
            version=event.version,
        )
    log.info(
        "records.report_stored",
        case_id=event.case_id,
        report_id=event.report_id,
        version=event.version,
        identity_from_images=placed is not None,
    )
