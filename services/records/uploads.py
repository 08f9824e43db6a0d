"""An upload of report and DICOM files for a case: validated as a whole, then stored as a whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import structlog
from sqlmodel import Session

from services.common.config import Settings
from services.records.assembly import assemble_if_complete, case_files, missing_items
from services.records.classify import ClassifiedFile, classify
from services.records.handlers import lock_request
from services.records.models import RecordFile, RecordRequest
from services.records.store import ObjectStore, ReceivedFile

log = structlog.get_logger(__name__)


class RecordsNotRequested(Exception):
    def __init__(self) -> None:
        super().__init__(
            "no records were requested for this case; "
            "records can be uploaded once the case is awaiting records"
        )


@dataclass(frozen=True)
class IncomingFile:
    stream: BinaryIO
    declared_type: str | None = None


@dataclass(frozen=True)
class UploadOutcome:
    request: RecordRequest
    files: list[RecordFile]
    new_files: int
    duplicates: int
    missing: list[str]
    assembled_now: bool


def accept_upload(
    case_id: str, incoming: Sequence[IncomingFile], session: Session, settings: Settings
) -> UploadOutcome:
    """Receive and validate every file, then store them all and commit; nothing is kept if one fails."""
    if session.get(RecordRequest, case_id) is None:
        raise RecordsNotRequested()
    session.rollback()  # hold no transaction open while the files stream in
    store = ObjectStore.for_settings(settings)
    total = len(incoming)
    received: list[ReceivedFile] = []
    try:
        for position, item in enumerate(incoming, start=1):
            received.append(
                store.receive(item.stream, position=position, total=total, limit=settings.max_upload_bytes)
            )
        classified = [
            classify(r, total=total, declared_type=item.declared_type)
            for r, item in zip(received, incoming, strict=True)
        ]
        return _store(case_id, classified, session, store)
    finally:
        for r in received:
            store.discard(r)


def _store(
    case_id: str, classified: list[ClassifiedFile], session: Session, store: ObjectStore
) -> UploadOutcome:
    request = lock_request(session, case_id)
    if request is None:
        raise RecordsNotRequested()
    on_record = {f.sha256: f for f in case_files(session, case_id)}
    files: dict[str, RecordFile] = {}
    new_files = 0
    for item in classified:
        sha256 = item.received.sha256
        if sha256 not in on_record:
            on_record[sha256] = _record_file(case_id, item, store.keep(item.received))
            session.add(on_record[sha256])
            new_files += 1
        files.setdefault(sha256, on_record[sha256])
    session.flush()
    assembled_now = assemble_if_complete(session, request, store)
    missing = missing_items(on_record.values())
    session.commit()
    log.info(
        "records.upload_stored",
        case_id=case_id,
        new_files=new_files,
        duplicates=len(classified) - new_files,
        assembled=assembled_now,
    )
    return UploadOutcome(
        request, list(files.values()), new_files, len(classified) - new_files, missing, assembled_now
    )


def _record_file(case_id: str, item: ClassifiedFile, storage_path: str) -> RecordFile:
    dicom = item.dicom
    return RecordFile(
        case_id=case_id,
        kind=item.kind,
        sha256=item.received.sha256,
        content_type=item.content_type,
        size_bytes=item.received.size_bytes,
        storage_path=storage_path,
        study_instance_uid=dicom.study_instance_uid if dicom else None,
        series_instance_uid=dicom.series_instance_uid if dicom else None,
        sop_instance_uid=dicom.sop_instance_uid if dicom else None,
        modality=dicom.modality if dicom else None,
        number_of_frames=dicom.number_of_frames if dicom else None,
    )
