"""An upload of report and DICOM files for a case (single files, a folder, a CD as ZIP, with or without a
DICOMDIR): validated as a whole, reconciled to the case's patient, then stored as a whole."""

from __future__ import annotations

import dataclasses
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import structlog
from sqlmodel import Session

from contracts.envelope import new_event
from contracts.events import IdentityMismatch
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.errors import RecordsRejected
from services.records.archive import Entry, expand_zip, is_zip_head, safe_relative_path
from services.records.assembly import SOURCE, assemble_if_complete, case_files, missing_items
from services.records.classify import PDF_TYPE, ClassifiedFile, HeaderReader, classify
from services.records.handlers import hold_content, lock_request
from services.records.header_probe import isolated_reader
from services.records.limits import ImportLimits, get_limits
from services.records.models import FileKind, ImportStatus, RecordFile, RecordImport, RecordRequest
from services.records.pdi import media_roots, on_media, select_listed
from services.records.reconcile import differences
from services.records.store import HEAD_BYTES, FileTooLarge, ObjectStore

log = structlog.get_logger(__name__)


class RecordsNotRequested(Exception):
    def __init__(self) -> None:
        super().__init__(
            "no records were requested for this case; "
            "records can be uploaded once the case is awaiting records"
        )


class RecordsCancelled(Exception):
    def __init__(self) -> None:
        super().__init__("this case was cancelled; its records request is closed and no upload is accepted")


@dataclass(frozen=True)
class IncomingFile:
    stream: BinaryIO
    declared_type: str | None = None
    name: str | None = None  # the uploader's relative path (a folder upload); matched against a DICOMDIR


@dataclass(frozen=True)
class UploadOutcome:
    request: RecordRequest
    files: list[RecordFile]
    new_files: int
    duplicates: int
    missing: list[str]
    assembled_now: bool
    record_import: RecordImport | None
    # Entries of an archive left out (a symbolic link, a device file), each by its position and why.
    warnings: list[str] = field(default_factory=list)


def accept_upload(
    case_id: str,
    incoming: Sequence[IncomingFile],
    session: Session,
    settings: Settings,
    *,
    source: str = "upload",
    limits: ImportLimits | None = None,
) -> UploadOutcome:
    """Receive and validate every file, then store them all and commit; nothing is kept if one fails."""
    check_open(session, case_id)  # and hold no transaction open while the files stream in
    limits = limits or get_limits()
    store = ObjectStore.for_settings(settings)
    left_out: list[str] = []
    entries = _receive(incoming, store, settings, limits, left_out)
    outcome = accept_entries(case_id, entries, session, settings, source=source, limits=limits)
    return with_left_out(outcome, left_out)


def with_left_out(outcome: UploadOutcome, left_out: list[str]) -> UploadOutcome:
    """The outcome with the archive entries that were left out said (and logged by position only)."""
    if left_out:
        log.info("records.upload_entries_left_out", case_id=outcome.request.case_id, left_out=left_out)
    return dataclasses.replace(outcome, warnings=[*outcome.warnings, *left_out])


def accept_entries(
    case_id: str,
    entries: list[Entry],
    session: Session,
    settings: Settings,
    *,
    source: str,
    limits: ImportLimits | None = None,
    in_transaction: bool = False,
    identity_reconciled: bool = False,
    awaiting_placement: bool = False,
) -> UploadOutcome:
    """Validate, reconcile and store files already received into the temp area; they are consumed.
    `in_transaction`: the caller's transaction holds other work (a consumer's batch of messages, with their
    inbox rows), so neither the check that the request is open nor the store ends it: the caller commits
    (a commit here made the batch's later messages look applied before they ran, and lost them when one
    of them failed).
    `identity_reconciled`: the files carry an identity taken from the case's released images (our own
    report placed into the study), so they are released without a second decision.
    `awaiting_placement`: our own report that cannot be placed yet (the case's images wait for an identity
    decision): kept out of the archive and not released until it is placed (second_opinion.py)."""
    store = ObjectStore.for_settings(settings)
    try:
        if in_transaction:
            _open_request(session, case_id)
        else:
            check_open(session, case_id)
        classified = _classify(entries, limits or get_limits())
        return _store(
            case_id,
            classified,
            session,
            store,
            source,
            identity_reconciled,
            awaiting_placement=awaiting_placement,
            commit=not in_transaction,
        )
    finally:
        for entry in entries:
            store.discard(entry.received)


def store_classified(
    case_id: str, classified: list[ClassifiedFile], session: Session, settings: Settings, *, source: str
) -> UploadOutcome:
    """Store files each already classified as usable (STOW-RS sorts a request's parts one by one) and
    commit; they are consumed."""
    store = ObjectStore.for_settings(settings)
    try:
        return _store(case_id, classified, session, store, source)
    finally:
        for item in classified:
            store.discard(item.received)


def header_reader(limits: ImportLimits) -> HeaderReader | None:
    """How untrusted headers are parsed under `limits`: in an isolated worker, or None (in process)."""
    if not limits.parse_in_subprocess:
        return None
    return isolated_reader(memory_bytes=limits.parse_memory_bytes, timeout=limits.parse_timeout_seconds)


def check_open(session: Session, case_id: str) -> None:
    """Refuse (RecordsNotRequested, RecordsCancelled) before an upload is received; no transaction is kept."""
    _open_request(session, case_id)
    session.rollback()


def _open_request(session: Session, case_id: str) -> RecordRequest:
    request = session.get(RecordRequest, case_id)
    if request is None:
        raise RecordsNotRequested()
    if request.cancelled_at is not None:
        raise RecordsCancelled()
    return request


def _receive(
    incoming: Sequence[IncomingFile],
    store: ObjectStore,
    settings: Settings,
    limits: ImportLimits,
    left_out: list[str],
) -> list[Entry]:
    total = len(incoming)
    entries: list[Entry] = []
    try:
        for position, item in enumerate(incoming, start=1):
            label = f"file {position} of {total}"
            relative = safe_relative_path(item.name) if item.name else None
            if item.name and relative is None and item.name not in ("", "."):
                raise RecordsRejected(
                    f"{label} has a path that leaves the upload root; nothing from this upload was stored"
                )
            spooled = _seekable_zip(item.stream)
            if spooled is not None and spooled > settings.max_upload_bytes:
                raise FileTooLarge(position, total, settings.max_upload_bytes)
            # A ZIP the web server already spooled is expanded from there, uncopied; anything else is
            # received into the temp area first (and a ZIP among those expanded from its copy).
            received = None
            if spooled is None:
                received = store.receive(
                    item.stream, position=position, total=total, limit=settings.max_upload_bytes
                )
                if not is_zip_head(received.head):
                    entries.append(Entry(received, relative, label, declared_type=item.declared_type))
                    continue
            try:
                entries += expand_zip(
                    item.stream if received is None else received.path,
                    position=position,
                    total=total,
                    store=store,
                    limits=limits,
                    upload_limit=settings.max_upload_bytes,
                    left_out=left_out,
                )
            finally:
                if received is not None:
                    store.discard(received)
    except BaseException:
        for entry in entries:
            store.discard(entry.received)
        raise
    return entries


def _seekable_zip(stream: BinaryIO) -> int | None:
    """The size of `stream` if it is a seekable ZIP (left at its start), else None (left where it was)."""
    try:
        if not stream.seekable():
            return None
        start = stream.tell()
        head = stream.read(HEAD_BYTES)
        stream.seek(start)
        if not is_zip_head(head):
            return None
        size = stream.seek(0, io.SEEK_END) - start
        stream.seek(start)
        return size
    except (OSError, ValueError):
        return None


def _classify(entries: list[Entry], limits: ImportLimits) -> list[ClassifiedFile]:
    listed, unlisted = select_listed(entries, limits.max_dicomdir_bytes)
    read_header = header_reader(limits)

    def check(entry: Entry) -> ClassifiedFile:
        known = entry.header
        return classify(
            entry.received,
            total=len(entries),
            declared_type=entry.declared_type,
            max_pixel_bytes=limits.max_pixel_bytes,
            max_header_bytes=limits.max_header_bytes,
            label=entry.label,
            read_header=read_header if known is None else lambda _: known,
        )

    classified = [check(e) for e in listed]
    # Beside a DICOMDIR a CD carries viewers and readme files: of those only a PDF (a report) is kept,
    # whether the CD came as a ZIP or as a folder. Files the uploader added next to the CD folder are
    # checked like any upload. A DICOMDIR that lists no file at all (written by a burner that failed, or
    # left from a blank disc) indexes nothing: then the media's DICOM files are kept as they are found.
    index_empty = not listed and len(unlisted) < len(entries)
    roots = media_roots(entries)
    for entry in unlisted:
        if not (entry.from_archive or on_media(entry, roots)):
            classified.append(check(entry))
            continue
        try:
            candidate = check(entry)
        except RecordsRejected:
            continue
        if candidate.content_type == PDF_TYPE or (index_empty and candidate.kind == FileKind.DICOM):
            classified.append(candidate)
    return [c for c in classified if c.kind != FileKind.DICOMDIR]


def _store(
    case_id: str,
    classified: list[ClassifiedFile],
    session: Session,
    store: ObjectStore,
    source: str,
    identity_reconciled: bool = False,
    *,
    awaiting_placement: bool = False,
    commit: bool = True,
) -> UploadOutcome:
    request = lock_request(session, case_id)
    if request is None:
        raise RecordsNotRequested()
    if request.cancelled_at is not None:
        raise RecordsCancelled()
    record_import = _reconcile(request, classified, source, identity_reconciled, awaiting_placement)
    if record_import is not None:
        session.add(record_import)
    on_record = {f.sha256: f for f in case_files(session, case_id, released_only=False)}
    files: dict[str, RecordFile] = {}
    new_files = 0
    for item in classified:
        sha256 = item.received.sha256
        if sha256 not in on_record:
            hold_content(session, sha256)  # a removal of the same content waits for this commit
            kept = store.keep(item.received) if awaiting_placement else _keep(store, item)
            on_record[sha256] = _record_file(case_id, item, kept, record_import)
            session.add(on_record[sha256])
            new_files += 1
        files.setdefault(sha256, on_record[sha256])
    session.flush()
    if record_import is not None and record_import.status == ImportStatus.IDENTITY_MISMATCH:
        mismatch = IdentityMismatch(
            case_id=case_id, import_id=record_import.import_id, differences=record_import.differences
        )
        enqueue(
            session,
            EVENTS,
            new_event(
                id=f"records.identity_mismatch:{record_import.import_id}",
                source=SOURCE,
                subject=case_id,
                data=mismatch,
            ),
        )
    assembled_now = assemble_if_complete(session, request, store)
    missing = missing_items([f for f in on_record.values() if f.released], request.exam)
    if commit:
        session.commit()
    else:
        session.flush()  # the caller's transaction: it commits with the rest of its work
    log.info(
        "records.upload_stored",
        case_id=case_id,
        import_id=record_import.import_id if record_import else None,
        import_status=record_import.status if record_import else None,
        differences=record_import.differences if record_import else None,
        new_files=new_files,
        duplicates=len(classified) - new_files,
        assembled=assembled_now,
    )
    return UploadOutcome(
        request,
        list(files.values()),
        new_files,
        len(classified) - new_files,
        missing,
        assembled_now,
        record_import,
    )


def _keep(store: ObjectStore, item: ClassifiedFile) -> str:
    if item.dicom is None:
        return store.keep(item.received)
    header = item.dicom
    return store.keep_dicom(
        item.received, header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )


def _reconcile(
    request: RecordRequest,
    classified: list[ClassifiedFile],
    source: str,
    identity_reconciled: bool = False,
    awaiting_placement: bool = False,
) -> RecordImport | None:
    """An import record for the DICOM part of the upload: released, or held when the identity differs (or,
    our report, until it can be placed)."""
    identities = [c.dicom.identity for c in classified if c.dicom is not None]
    if not identities:
        return None
    found = [] if identity_reconciled or awaiting_placement else differences(identities, request.patient)
    status = ImportStatus.IDENTITY_MISMATCH if found else ImportStatus.RELEASED
    return RecordImport(
        import_id=str(uuid.uuid4()),
        case_id=request.case_id,
        source=source,
        status=ImportStatus.AWAITING_PLACEMENT if awaiting_placement else status,
        differences=found,
    )


def _record_file(
    case_id: str, item: ClassifiedFile, storage_path: str, record_import: RecordImport | None
) -> RecordFile:
    dicom = item.dicom
    held = dicom is not None and record_import is not None and record_import.status != ImportStatus.RELEASED
    return RecordFile(
        case_id=case_id,
        import_id=record_import.import_id if (dicom and record_import) else None,
        released=not held,
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
        sop_class_uid=dicom.sop_class_uid or None if dicom else None,
        study_date=dicom.study_date or None if dicom else None,
        has_regions=dicom.has_regions if dicom else None,
        record_type=item.record_type,
        record_date=item.record_date,
        burned_in_annotation=dicom.burned_in_annotation or None if dicom else None,
        view_label=dicom.view_label or None if dicom else None,
    )
