"""HTTP API: upload a case's report and DICOM files (or a CD as ZIP / folder), see what is on record and
how adequate it is, download a stored file (DICOM with our identifiers coerced)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, HTTPException, Path, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from services.auth import AuthEngine, Caller, Principal, Role
from services.auth.access import case_scope, record
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.body_feed import feed_to_thread
from services.common.config import Settings, get_settings
from services.common.db import get_engine, utcnow
from services.common.errors import human_size
from services.common.http import HeadFileResponse, HeadStreamingResponse
from services.records import report_study, uploads, zip_stream
from services.records.adequacy import assess
from services.records.archive import Entry
from services.records.archive_store import ArchiveUnavailable
from services.records.assembly import case_files
from services.records.classify import DICOM_TYPE
from services.records.limits import ImportLimits, get_limits
from services.records.models import (
    ImportPublic,
    ImportStatus,
    RecordFile,
    RecordFilePublic,
    RecordImport,
    RecordRequest,
    RecordRetrieval,
    RecordSource,
    RecordSourceIn,
    RecordSourcePublic,
    RecordsPublic,
    ReportReturn,
    ReportReturnPublic,
    RetrievalPublic,
    UploadPublic,
)
from services.records.reconcile import coerced_chunks, our_identifiers
from services.records.retrieval import check_client_tls, plain_dimse_refusal, plain_dimse_refused
from services.records.store import FileTooLarge, ObjectStore

# Every route needs a key; a case's records are its partner's and operations' (uploads too), and readable
# by the specialists it was offered to.
router = APIRouter(
    prefix="/v1/records",
    tags=["records"],
    dependencies=[Depends(case_scope("records", specialists=True))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)

_outbox_listeners: list[Callable[[], None]] = []


def on_outbox_written(listener: Callable[[], None]) -> None:
    """Call `listener` after a request commits outbox rows (main wires the relay's wake here)."""
    _outbox_listeners.append(listener)


def notify_outbox() -> None:
    for listener in _outbox_listeners:
        listener()


def get_session() -> Iterator[Session]:
    with Session(get_engine("records"), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LimitsDep = Annotated[ImportLimits, Depends(get_limits)]
CaseId = Annotated[str, Path(min_length=1, max_length=64)]
PartnerId = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
Uid = Annotated[str, Path(pattern=r"^[0-9.]{1,64}$")]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="lower-case hex SHA-256 of the file")]
UNKNOWN_CASE = "no records were requested for this case; check the case id"


def own_source(request: Request, caller: Principal, engine: AuthEngine, partner_id: str) -> None:
    """A partner configures only its own source (404 for another's, audited); operations any."""
    if caller.role == Role.OPERATIONS or (caller.role == Role.PARTNER and caller.partner_id == partner_id):
        return
    record(request, engine, caller, "records.source", None, "denied", f"source of partner {partner_id}")
    raise HTTPException(404, "no image source of this partner is visible to your key; check the partner id")


@router.put(
    "/sources/{partner_id}",
    responses={422: {"description": "neither a complete DIMSE source nor a DICOMweb URL"}},
)
def put_source(
    partner_id: PartnerId,
    source: RecordSourceIn,
    session: SessionDep,
    request: Request,
    caller: Caller,
    engine: AuthEngine,
    settings: SettingsDep,
) -> RecordSourcePublic:
    """Configure where this partner's images are fetched from when a case names its study, and whether the
    second-opinion report goes back into that PACS (`return_reports`); `tls` for DICOM over TLS, whose
    files are checked now."""
    own_source(request, caller, engine, partner_id)
    dimse_complete = source.ae_title and source.host and source.port
    if not dimse_complete and not source.dicomweb_url:
        raise HTTPException(
            422, "give either ae_title, host and port (a DIMSE PACS) or dicomweb_url (a DICOMweb service)"
        )
    if dimse_complete and not source.tls and plain_dimse_refused(str(source.host), settings):
        raise HTTPException(422, plain_dimse_refusal())
    if source.tls and (unusable := check_client_tls(source, settings)) is not None:
        raise HTTPException(422, unusable)
    row = _store_source(session, partner_id, source)
    return RecordSourcePublic.model_validate(row, from_attributes=True)


def _store_source(session: Session, partner_id: str, source: RecordSourceIn) -> RecordSource:
    """Replace the partner's source with `source` whole. Locked, so PUTs at once apply one after the other
    (never a row mixing two bodies); a source another PUT created meanwhile is replaced in turn."""
    try:
        return _replace_source(session, partner_id, source)
    except IntegrityError:
        session.rollback()  # created by a PUT that looked at the same time, and committed first
        return _replace_source(session, partner_id, source)


def _replace_source(session: Session, partner_id: str, source: RecordSourceIn) -> RecordSource:
    row = session.get(RecordSource, partner_id, with_for_update=True) or RecordSource(partner_id=partner_id)
    for key, value in source.model_dump().items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


@router.get("/sources/{partner_id}", responses={404: {"description": "no source configured"}})
def get_source(
    partner_id: PartnerId, session: SessionDep, request: Request, caller: Caller, engine: AuthEngine
) -> RecordSourcePublic:
    own_source(request, caller, engine, partner_id)
    row = session.get(RecordSource, partner_id)
    if row is None:
        raise HTTPException(404, "no image source is configured for this partner; PUT one first")
    return RecordSourcePublic.model_validate(row, from_attributes=True)


UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no records request for this case yet"},
    409: {"description": "the case was cancelled"},
    413: {"description": "a file exceeds the upload size limit"},
    503: {"description": "the image archive (RECORDS_STORAGE=dicomweb) is not reachable"},
    422: {"description": "a file or archive member is unusable or hostile; nothing was stored"},
}


@router.post("/{case_id}/files", status_code=201, responses=UPLOAD_RESPONSES)
def upload_files(
    case_id: CaseId,
    files: Annotated[
        list[UploadFile],
        File(
            description="the original report (PDF or text) and DICOM files; a CD as one ZIP, or a folder "
            "(file names carrying their relative paths), with or without a DICOMDIR"
        ),
    ],
    session: SessionDep,
    settings: SettingsDep,
    limits: LimitsDep,
) -> UploadPublic:
    incoming = [uploads.IncomingFile(f.file, f.content_type, f.filename) for f in files]
    with _upload_refusals():
        outcome = uploads.accept_upload(case_id, incoming, session, settings, limits=limits)
    return _uploaded(case_id, outcome)


ZIP_MEDIA_TYPES = ("application/zip", "application/x-zip-compressed")


@router.post(
    "/{case_id}/archive",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}} for media in ZIP_MEDIA_TYPES
            },
        }
    },
    responses={
        **UPLOAD_RESPONSES,
        400: {"description": "the body ended before it was complete (the client went away)"},
        415: {"description": "the body is not sent as application/zip"},
    },
)
async def upload_archive(
    case_id: CaseId, request: Request, session: SessionDep, settings: SettingsDep, limits: LimitsDep
) -> UploadPublic:
    """A CD as one ZIP sent as the request body (`Content-Type: application/zip`, e.g. `curl --data-binary
    @cd.zip`), expanded while it arrives: no form encoding and no spooled copy of the archive, so a large
    study imports at about the disk's speed. Validated, reconciled and stored as a whole, like `/files`."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media not in ZIP_MEDIA_TYPES:
        raise HTTPException(
            415,
            "send the ZIP file's bytes as the request body with Content-Type: application/zip; "
            "single files and folders go to /v1/records/{case_id}/files as multipart form data",
        )
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, _too_large(limit))
    # Refuse before a byte is read when the case takes no records.
    await run_in_threadpool(_check_open, session, case_id)
    store = ObjectStore.for_settings(settings)
    left_out: list[str] = []
    try:
        entries = await feed_to_thread(
            request.stream(),
            partial(
                zip_stream.expand_zip_stream,
                store=store,
                limits=limits,
                upload_limit=limit,
                left_out=left_out,
            ),
            drain_limit=limit,
        )
    except zip_stream.BodyTooLarge:
        raise HTTPException(413, _too_large(limit)) from None
    except ClientDisconnect:
        raise HTTPException(
            400, "the upload ended before the whole archive arrived; nothing was stored, send it again"
        ) from None
    return await run_in_threadpool(_accept_entries, case_id, entries, session, settings, limits, left_out)


def _check_open(session: Session, case_id: str) -> None:
    with _upload_refusals():
        uploads.check_open(session, case_id)


def _accept_entries(
    case_id: str,
    entries: list[Entry],
    session: Session,
    settings: Settings,
    limits: ImportLimits,
    left_out: list[str],
) -> UploadPublic:
    with _upload_refusals():
        outcome = uploads.accept_entries(case_id, entries, session, settings, source="upload", limits=limits)
    return _uploaded(case_id, uploads.with_left_out(outcome, left_out))


def _too_large(limit: int) -> str:
    return (
        f"the ZIP archive is larger than the {human_size(limit)} limit; nothing from this upload was stored"
    )


@contextlib.contextmanager
def _upload_refusals() -> Iterator[None]:
    """An upload's refusals answered with the status each one means."""
    try:
        yield
    except uploads.RecordsNotRequested as exc:
        raise HTTPException(404, str(exc)) from None
    except uploads.RecordsCancelled as exc:
        raise HTTPException(409, str(exc)) from None
    except FileTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except ArchiveUnavailable as exc:
        raise HTTPException(
            503, f"{exc}; nothing from this upload was indexed, send it again later"
        ) from None


def _uploaded(case_id: str, outcome: uploads.UploadOutcome) -> UploadPublic:
    notify_outbox()
    held = outcome.record_import
    return UploadPublic(
        case_id=case_id,
        status=outcome.request.status,
        import_id=held.import_id if held else None,
        import_status=held.status if held else None,  # type: ignore[arg-type]
        missing=outcome.missing,
        new_files=outcome.new_files,
        duplicates=outcome.duplicates,
        files=[RecordFilePublic.of(f) for f in outcome.files],
        warnings=outcome.warnings,
    )


@router.get("/{case_id}", responses={404: {"description": "no records request for this case"}})
def get_records(case_id: CaseId, session: SessionDep) -> RecordsPublic:
    request = session.get(RecordRequest, case_id)
    if request is None:
        raise HTTPException(404, UNKNOWN_CASE)
    files = case_files(session, case_id)
    adequacy = assess(files, request.exam)
    retrievals = session.exec(
        select(RecordRetrieval)
        .where(RecordRetrieval.case_id == case_id)
        .order_by(col(RecordRetrieval.created_at))
    ).all()
    imports = session.exec(
        select(RecordImport).where(RecordImport.case_id == case_id).order_by(col(RecordImport.created_at))
    ).all()
    returns = session.exec(
        select(ReportReturn).where(ReportReturn.case_id == case_id).order_by(col(ReportReturn.created_at))
    ).all()
    return RecordsPublic(
        case_id=case_id,
        status=request.status,
        missing=adequacy.missing,
        warnings=adequacy.warnings,
        adequacy=adequacy.model_dump(),
        assembled_at=request.assembled_at,
        imports=[ImportPublic.of(i) for i in imports],
        retrievals=[RetrievalPublic.of(r) for r in retrievals],
        files=[RecordFilePublic.of(f) for f in files],
        report_returns=[ReportReturnPublic.of(r) for r in returns],
    )


@router.get(
    "/{case_id}/files/{sha256}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/dicom": {}, "application/pdf": {}, "text/plain": {}}},
        404: {"description": "no such file in this case"},
        409: {"description": "the file waits for an identity decision (on it, or on the case's images)"},
    },
)
def download_file(case_id: CaseId, sha256: Sha256, session: SessionDep, settings: SettingsDep) -> Response:
    query = select(RecordFile).where(RecordFile.case_id == case_id, RecordFile.sha256 == sha256)
    row = session.exec(query).first()
    request = session.get(RecordRequest, case_id)
    if row is None or request is None:
        raise HTTPException(
            404, "this case has no file with that SHA-256; list its files at /v1/records/{case_id}"
        )
    if not row.released:
        raise HTTPException(
            409,
            "this file waits for a person's identity decision (on it, or on the case's images); it is "
            "released once decided",
        )
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    if row.content_type != DICOM_TYPE:
        return HeadFileResponse(path, media_type=row.content_type)
    return HeadStreamingResponse(_handed_out(session, settings, request, row), media_type=DICOM_TYPE)


# A person's identity decision can take hours: a client that polls asks again in minutes, not seconds.
DECISION_RETRY_AFTER = "300"
STORE_RETRY_AFTER = "10"  # the report event reaches records seconds after the review service issues it


@router.get(
    "/{case_id}/second-opinion/{sop_instance_uid}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "the report instance as records holds it"},
        404: {"description": "records holds no report instance issued under this UID (yet)"},
        409: {"description": "records holds it, but has not placed it into the study yet (Retry-After)"},
    },
)
def download_second_opinion(
    case_id: CaseId, sop_instance_uid: Uid, session: SessionDep, settings: SettingsDep
) -> Response:
    """The second-opinion report instance the review service issued under `sop_instance_uid`, as records
    stores it, placed into the study it reads, and hands it out (WADO-RS the same bytes): the review
    service's DICOM download serves this, so one SOP Instance UID never reaches a PACS with two patients or
    studies (with our identifiers, the facility's kept as the originals: reconcile.py). Placed into another
    study than it named, it is another instance: `Content-Location` says which."""
    request = session.get(RecordRequest, case_id)
    found = report_study.stored_report(session, case_id, sop_instance_uid) if request else None
    if request is None or found is None:
        raise HTTPException(
            404,
            f"records holds no second-opinion report issued as {sop_instance_uid} for this case: it is "
            "stored seconds after the review service issues it (not once the case is cancelled); retry",
            headers={"Retry-After": STORE_RETRY_AFTER},
        )
    row, record_import = found
    if not row.released:
        why = (
            "images of this case wait for a person's identity decision, and the report takes the identity "
            "of the study it is placed into after it"
            if record_import.status == ImportStatus.AWAITING_PLACEMENT
            else "the report instance itself waits for a person's identity decision"
        )
        raise HTTPException(
            409,
            f"records has not placed this report into the study yet: {why}. Retry once operations have "
            f"decided the import held for its identity (under imports at /v1/records/{case_id})",
            headers={"Retry-After": DECISION_RETRY_AFTER},
        )
    wado = (
        f"{settings.records_url}/dicomweb/cases/{case_id}/studies/{row.study_instance_uid}"
        f"/series/{row.series_instance_uid}/instances/{row.sop_instance_uid}"
    )
    return HeadStreamingResponse(
        _handed_out(session, settings, request, row),
        media_type=DICOM_TYPE,
        headers={"Content-Location": wado},
    )


def _handed_out(
    session: Session, settings: Settings, request: RecordRequest, row: RecordFile
) -> Iterator[bytes]:
    """A stored DICOM file as records hands it out (download, WADO-RS): our identifiers coerced, the
    originals kept, stamped with when its import was released."""
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    held = session.get(RecordImport, row.import_id) if row.import_id else None
    modified_at = (held.decided_at or held.created_at) if held else row.created_at
    return coerced_chunks(path, our_identifiers(row.case_id, request.exam), modified_at)
