"""`GET /v1/records/{case_id}/export/deidentified`: the case's released images, de-identified, as one ZIP
with a DEIDENTIFICATION.json manifest (profile, method codes, what was withheld and why)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import structlog
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from sqlmodel import col, select
from starlette.background import BackgroundTask

from services.records.api import CaseId, SessionDep, SettingsDep
from services.records.deidentify import BASIC_PROFILE_CODE, METHOD, UidMap, deidentified_chunks, may_export
from services.records.models import FileKind, RecordFile, RecordRequest
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1/records", tags=["records"])


@router.get(
    "/{case_id}/export/deidentified",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}}, 404: {"description": "no released images"}},
)
def export_deidentified(case_id: CaseId, session: SessionDep, settings: SettingsDep) -> FileResponse:
    if session.get(RecordRequest, case_id) is None:
        raise HTTPException(404, "no records were requested for this case; check the case id")
    rows = list(
        session.exec(
            select(RecordFile)
            .where(
                RecordFile.case_id == case_id,
                RecordFile.kind == FileKind.DICOM,
                col(RecordFile.released).is_(True),
            )
            .order_by(col(RecordFile.id))
        ).all()
    )
    if not rows:
        raise HTTPException(404, "this case has no released images to export")
    store = ObjectStore.for_settings(settings)
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="export-", suffix=".zip")
    os.close(fd)
    path = Path(name)
    try:
        exported, withheld = _write_zip(path, rows, store)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("records.export_deidentified", case_id=case_id, exported=exported, withheld=withheld)
    return FileResponse(
        path,
        media_type="application/zip",
        filename="deidentified.zip",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


def _write_zip(path: Path, rows: list[RecordFile], store: ObjectStore) -> tuple[int, int]:
    uids = UidMap()
    exported = withheld = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for row in rows:
            if not may_export(row.burned_in_annotation):
                withheld += 1
                continue
            exported += 1
            with archive.open(f"DICOM/IM{exported:05d}.dcm", "w", force_zip64=True) as out:
                for chunk in deidentified_chunks(store.local_path(row.storage_path, row.sha256), uids):
                    out.write(chunk)
        manifest = {
            "profile": METHOD,
            "method_codes": [
                dict(zip(("code_value", "coding_scheme", "code_meaning"), BASIC_PROFILE_CODE, strict=True))
            ],
            "exported": exported,
            "withheld": withheld,
            "withheld_reason": "burned-in annotation not ruled out (Burned In Annotation is not NO) "
            "and no pixel-cleaning rule exists for these images",
        }
        archive.writestr("DEIDENTIFICATION.json", json.dumps(manifest, indent=2))
    return exported, withheld
