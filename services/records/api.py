"""HTTP API: upload a case's report and DICOM files, see what is on record, download a stored file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Path, UploadFile
from fastapi.responses import FileResponse
from sqlmodel import Session, select

from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.records import uploads
from services.records.assembly import case_files, missing_items
from services.records.models import RecordFile, RecordFilePublic, RecordRequest, RecordsPublic, UploadPublic
from services.records.store import FileTooLarge, ObjectStore

router = APIRouter(prefix="/v1/records", tags=["records"])

_outbox_listeners: list[Callable[[], None]] = []


def on_outbox_written(listener: Callable[[], None]) -> None:
    """Call `listener` after a request commits outbox rows (main wires the relay's wake here)."""
    _outbox_listeners.append(listener)


def get_session() -> Iterator[Session]:
    with Session(get_engine("records"), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CaseId = Annotated[str, Path(min_length=1, max_length=64)]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="lower-case hex SHA-256 of the file")]
UNKNOWN_CASE = "no records were requested for this case; check the case id"


@router.post(
    "/{case_id}/files",
    status_code=201,
    responses={
        404: {"description": "no records request for this case yet"},
        413: {"description": "a file exceeds the upload size limit"},
        422: {"description": "a file is neither a report (PDF, UTF-8 text) nor DICOM; nothing was stored"},
    },
)
def upload_files(
    case_id: CaseId,
    files: Annotated[list[UploadFile], File(description="the original report (PDF or text) and DICOM files")],
    session: SessionDep,
    settings: SettingsDep,
) -> UploadPublic:
    incoming = [uploads.IncomingFile(f.file, f.content_type) for f in files]
    try:
        outcome = uploads.accept_upload(case_id, incoming, session, settings)
    except uploads.RecordsNotRequested as exc:
        raise HTTPException(404, str(exc)) from None
    except FileTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    if outcome.assembled_now:
        for listener in _outbox_listeners:
            listener()
    return UploadPublic(
        case_id=case_id,
        status=outcome.request.status,
        missing=outcome.missing,
        new_files=outcome.new_files,
        duplicates=outcome.duplicates,
        files=[RecordFilePublic.of(f) for f in outcome.files],
    )


@router.get("/{case_id}", responses={404: {"description": "no records request for this case"}})
def get_records(case_id: CaseId, session: SessionDep) -> RecordsPublic:
    request = session.get(RecordRequest, case_id)
    if request is None:
        raise HTTPException(404, UNKNOWN_CASE)
    files = case_files(session, case_id)
    return RecordsPublic(
        case_id=case_id,
        status=request.status,
        missing=missing_items(files),
        assembled_at=request.assembled_at,
        files=[RecordFilePublic.of(f) for f in files],
    )


@router.get(
    "/{case_id}/files/{sha256}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/dicom": {}, "application/pdf": {}, "text/plain": {}}},
        404: {"description": "no such file in this case"},
    },
)
def download_file(
    case_id: CaseId, sha256: Sha256, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    query = select(RecordFile).where(RecordFile.case_id == case_id, RecordFile.sha256 == sha256)
    row = session.exec(query).first()
    if row is None:
        raise HTTPException(
            404, "this case has no file with that SHA-256; list its files at /v1/records/{case_id}"
        )
    return FileResponse(
        ObjectStore.for_settings(settings).path(row.storage_path), media_type=row.content_type
    )
