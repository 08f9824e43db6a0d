"""DICOMweb on `/dicomweb/`: STOW-RS into the same validated, reconciled import path as uploads, and
QIDO-RS / WADO-RS over what was imported and released, scoped to one case.

Base URL of a case: `/dicomweb/cases/{case_id}` (give it to a DICOMweb client or a viewer as its root).
`POST /dicomweb/studies` also accepts a study for the open request whose exam names its Study Instance UID
or Accession Number.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from services.auth import AuthEngine, Caller, tenancy
from services.auth.access import case_scope, check_case
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.config import Settings
from services.common.errors import RecordsRejected
from services.records import uploads
from services.records.api import SessionDep, SettingsDep, notify_outbox
from services.records.archive import Entry
from services.records.archive_store import ArchiveUnavailable
from services.records.classify import header_or_none
from services.records.limits import ImportLimits, get_limits
from services.records.models import ImportStatus, RecordFile, RecordImport, RecordRequest
from services.records.multipart_related import UnsupportedMediaType, receive_parts
from services.records.reconcile import coerced_chunks, coerced_header, our_identifiers
from services.records.store import FileTooLarge, ObjectStore

# Every route needs a key and is scoped to the case like /v1/records (STOW: the partner and operations).
router = APIRouter(
    prefix="/dicomweb",
    tags=["dicomweb"],
    dependencies=[Depends(case_scope("records.dicomweb", specialists=True))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)

DICOM_JSON = "application/dicom+json"
Uid = Annotated[str, Path(pattern=r"^[0-9.]{1,64}$")]
CaseId = Annotated[str, Path(min_length=1, max_length=64)]
LimitsDep = Annotated[ImportLimits, Depends(get_limits)]


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _dicom_json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


# --- STOW-RS -------------------------------------------------------------------------------------


@router.post("/cases/{case_id}/studies", response_class=JSONResponse)
async def store_instances(
    case_id: CaseId, request: Request, session: SessionDep, settings: SettingsDep, limits: LimitsDep
) -> JSONResponse:
    return await _stow(request, session, settings, limits, case_id=case_id, study=None)


@router.post("/cases/{case_id}/studies/{study}", response_class=JSONResponse)
async def store_study_instances(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: LimitsDep,
) -> JSONResponse:
    return await _stow(request, session, settings, limits, case_id=case_id, study=study)


@router.post("/studies", response_class=JSONResponse)
async def store_instances_for_requested_study(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: LimitsDep,
    caller: Caller,
    engine: AuthEngine,
) -> JSONResponse:
    def visible(case_id: str) -> bool:
        return tenancy.may_see_case(engine, caller.role, caller.partner_id, caller.specialist_id, case_id)

    def admit(case_id: str) -> None:
        check_case(request, engine, caller, case_id, "records.dicomweb", specialists=False)

    return await _stow(request, session, settings, limits, case_id=None, study=None, scope=(visible, admit))


async def _stow(
    request: Request,
    session: Session,
    settings: Settings,
    limits: ImportLimits,
    *,
    case_id: str | None,
    study: str | None,
    scope: tuple[Callable[[str], bool], Callable[[str], None]] | None = None,
) -> JSONResponse:
    store = ObjectStore.for_settings(settings)
    try:
        entries = await receive_parts(
            request.headers.get("content-type"),
            request.stream(),
            store,
            max_parts=limits.max_archive_members,
            limit=settings.max_upload_bytes,
        )
    except UnsupportedMediaType as exc:
        raise HTTPException(415, str(exc)) from None
    except FileTooLarge as exc:
        raise HTTPException(413, str(exc).replace("file", "part", 1)) from None
    try:
        return await run_in_threadpool(
            _stow_entries, entries, session, settings, limits, case_id, study, scope
        )
    finally:
        for entry in entries:
            store.discard(entry.received)


def _stow_entries(
    entries: list[Entry],
    session: Session,
    settings: Settings,
    limits: ImportLimits,
    case_id: str | None,
    study: str | None,
    scope: tuple[Callable[[str], bool], Callable[[str], None]] | None = None,
) -> JSONResponse:
    if case_id is None:
        visible, admit = scope or (lambda _: True, lambda _: None)
        case_id = _case_for(entries, session, visible)
        admit(case_id)
    if study is not None:
        _check_study(entries, study)
    try:
        outcome = uploads.accept_entries(case_id, entries, session, settings, source="stow-rs", limits=limits)
    except uploads.RecordsNotRequested as exc:
        raise HTTPException(404, str(exc)) from None
    except uploads.RecordsCancelled as exc:
        raise HTTPException(409, str(exc)) from None
    except ArchiveUnavailable as exc:
        raise HTTPException(
            503, f"{exc}; nothing from this request was indexed, send it again later"
        ) from None
    notify_outbox()
    held = outcome.record_import is not None and outcome.record_import.status != ImportStatus.RELEASED
    base = f"{settings.records_url}/dicomweb/cases/{case_id}"
    referenced = [
        {
            "00081150": _attr("UI", f.sop_class_uid or ""),
            "00081155": _attr("UI", f.sop_instance_uid),
            "00081190": _attr(
                "UR",
                f"{base}/studies/{f.study_instance_uid}/series/{f.series_instance_uid}/instances/{f.sop_instance_uid}",
            ),
        }
        for f in outcome.files
        if f.sop_instance_uid
    ]
    body: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": referenced}}
    if held:
        # Stored, but held for an identity decision: nothing is retrievable until a human accepts it.
        body["00081196"] = _attr("US", 0xB000)
    return _dicom_json(body, 202 if held else 200)


def _case_for(entries: list[Entry], session: Session, visible: Callable[[str], bool]) -> str:
    headers = [h for e in entries if (h := header_or_none(e.received.path)) is not None]
    open_requests = session.exec(select(RecordRequest).where(col(RecordRequest.cancelled_at).is_(None))).all()
    matches = {
        r.case_id
        for r in open_requests
        for h in headers
        if (r.exam.get("study_instance_uid") and r.exam["study_instance_uid"] == h.study_instance_uid)
        or (r.exam.get("accession_number") and r.exam["accession_number"] == h.accession_number)
    }
    matches = {case_id for case_id in matches if visible(case_id)}  # other partners' cases stay unseen
    if len(matches) != 1:
        raise HTTPException(
            404 if not matches else 409,
            "no single open records request names this study's Study Instance UID or Accession Number; "
            "store it at /dicomweb/cases/{case_id}/studies instead",
        )
    return matches.pop()


def _check_study(entries: list[Entry], study: str) -> None:
    for entry in entries:
        header = header_or_none(entry.received.path)
        if header is not None and header.study_instance_uid != study:
            raise RecordsRejected(
                f"{entry.label} belongs to another study than the one in the URL; nothing was stored"
            )


# --- QIDO-RS -------------------------------------------------------------------------------------


def _released(session: Session, case_id: str, **where: str | None) -> list[RecordFile]:
    query = select(RecordFile).where(
        RecordFile.case_id == case_id,
        col(RecordFile.released).is_(True),
        col(RecordFile.sop_instance_uid).is_not(None),
    )
    for column, value in where.items():
        if value:
            query = query.where(col(getattr(RecordFile, column)).in_(value.split(",")))
    return list(session.exec(query.order_by(col(RecordFile.id))).all())


def _identifiers(session: Session, case_id: str) -> dict[str, str]:
    request = session.get(RecordRequest, case_id)
    if request is None:
        raise HTTPException(404, "no records were requested for this case; check the case id")
    return our_identifiers(case_id, request.exam)


def _page(items: list[dict[str, Any]], limit: int | None, offset: int) -> list[dict[str, Any]]:
    return items[offset : offset + limit if limit else None]


Limit = Annotated[int | None, Query(ge=1, le=10000)]
Offset = Annotated[int, Query(ge=0)]


@router.get("/cases/{case_id}/studies")
def search_studies(
    case_id: CaseId,
    session: SessionDep,
    settings: SettingsDep,
    StudyInstanceUID: str | None = None,  # noqa: N803 - DICOMweb names query keys by keyword
    ModalitiesInStudy: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    ids = _identifiers(session, case_id)
    files = _released(session, case_id, study_instance_uid=StudyInstanceUID)
    studies: dict[str, list[RecordFile]] = {}
    for f in files:
        studies.setdefault(str(f.study_instance_uid), []).append(f)
    wanted = set((ModalitiesInStudy or "").split(",")) - {""}
    results = []
    for uid, members in studies.items():
        modalities = sorted({str(m.modality) for m in members})
        if wanted and not wanted & set(modalities):
            continue
        results.append(
            {
                "0020000D": _attr("UI", uid),
                "00080020": _attr("DA", *[d for d in {m.study_date for m in members} if d][:1]),
                "00080050": _attr("SH", ids["AccessionNumber"]),
                "00080061": _attr("CS", *modalities),
                "00100020": _attr("LO", ids["PatientID"]),
                "00201206": _attr("IS", len({m.series_instance_uid for m in members})),
                "00201208": _attr("IS", len(members)),
                "00081190": _attr("UR", f"{settings.records_url}/dicomweb/cases/{case_id}/studies/{uid}"),
            }
        )
    return _dicom_json(_page(results, limit, offset))


@router.get("/cases/{case_id}/studies/{study}/series")
def search_series(
    case_id: CaseId,
    study: Uid,
    session: SessionDep,
    Modality: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    _identifiers(session, case_id)
    series: dict[str, list[RecordFile]] = {}
    for f in _released(session, case_id, study_instance_uid=study, modality=Modality):
        series.setdefault(str(f.series_instance_uid), []).append(f)
    results = [
        {
            "0020000D": _attr("UI", study),
            "0020000E": _attr("UI", uid),
            "00080060": _attr("CS", members[0].modality),
            "00201209": _attr("IS", len(members)),
        }
        for uid, members in series.items()
    ]
    return _dicom_json(_page(results, limit, offset))


@router.get("/cases/{case_id}/studies/{study}/instances")
@router.get("/cases/{case_id}/studies/{study}/series/{series}/instances")
def search_instances(
    case_id: CaseId,
    study: Uid,
    session: SessionDep,
    series: str | None = None,
    SOPInstanceUID: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    _identifiers(session, case_id)
    files = _released(
        session,
        case_id,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=SOPInstanceUID,
    )
    results = [
        {
            "0020000D": _attr("UI", f.study_instance_uid),
            "0020000E": _attr("UI", f.series_instance_uid),
            "00080018": _attr("UI", f.sop_instance_uid),
            "00080016": _attr("UI", *([f.sop_class_uid] if f.sop_class_uid else [])),
            "00080060": _attr("CS", f.modality),
            "00280008": _attr("IS", f.number_of_frames or 1),
        }
        for f in files
    ]
    return _dicom_json(_page(results, limit, offset))


# --- WADO-RS -------------------------------------------------------------------------------------


def _retrievable(
    session: Session, case_id: str, study: str, series: str | None, sop: str | None
) -> tuple[list[RecordFile], dict[str, str]]:
    ids = _identifiers(session, case_id)
    files = _released(
        session, case_id, study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop
    )
    if not files:
        raise HTTPException(
            404, "nothing released in this case matches these UIDs; search with QIDO-RS first"
        )
    return files, ids


def _modified_at(session: Session, row: RecordFile) -> datetime:
    held = session.get(RecordImport, row.import_id) if row.import_id else None
    return (held.decided_at or held.created_at) if held else row.created_at


@router.get("/cases/{case_id}/studies/{study}", response_class=StreamingResponse)
@router.get("/cases/{case_id}/studies/{study}/series/{series}", response_class=StreamingResponse)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}", response_class=StreamingResponse
)
def retrieve(
    case_id: CaseId,
    study: Uid,
    session: SessionDep,
    settings: SettingsDep,
    series: str | None = None,
    sop: str | None = None,
) -> StreamingResponse:
    files, ids = _retrievable(session, case_id, study, series, sop)
    store = ObjectStore.for_settings(settings)
    parts = [(store.local_path(f.storage_path, f.sha256), _modified_at(session, f)) for f in files]
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path, modified_at in parts:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield from coerced_chunks(path, ids, modified_at)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


@router.get("/cases/{case_id}/studies/{study}/metadata")
@router.get("/cases/{case_id}/studies/{study}/series/{series}/metadata")
@router.get("/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/metadata")
def retrieve_metadata(
    case_id: CaseId,
    study: Uid,
    session: SessionDep,
    settings: SettingsDep,
    series: str | None = None,
    sop: str | None = None,
) -> JSONResponse:
    files, ids = _retrievable(session, case_id, study, series, sop)
    store = ObjectStore.for_settings(settings)
    metadata = [
        coerced_header(
            store.local_path(f.storage_path, f.sha256), ids, _modified_at(session, f)
        ).to_json_dict()
        for f in files
    ]
    return _dicom_json(metadata)
