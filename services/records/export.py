"""`GET /v1/records/{case_id}/export/deidentified`: the case's released images, de-identified, as one ZIP
with a DEIDENTIFICATION.json manifest (profile, method codes, what was withheld and why)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import structlog
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse
from pydicom.fileset import FileSet
from sqlmodel import col, select
from starlette.background import BackgroundTask

from services.auth.access import case_scope
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.records.api import CaseId, SessionDep, SettingsDep
from services.records.deidentify import (
    BASIC_PROFILE_CODE,
    METHOD,
    TABLE_EDITION,
    UidMap,
    deidentified_chunks,
    deidentified_header,
    may_export,
)
from services.records.models import FileKind, RecordFile, RecordRequest
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)
router = APIRouter(
    prefix="/v1/records",
    tags=["records"],
    dependencies=[Depends(case_scope("records", specialists=True))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)


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
    """An IHE PDI-style file-set: a DICOMDIR at the root, instances under PS3.10 file IDs (up to 8 upper-case
    letters, digits or underscores per component, no extension), so media importers and PACS read it."""
    uids = UidMap()
    exported = withheld = 0
    fileset = FileSet()
    sources: dict[str, Path] = {}
    with (
        tempfile.TemporaryDirectory(dir=store.tmp_dir) as staging,
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for row in rows:
            if not may_export(row.burned_in_annotation):
                withheld += 1
                continue
            exported += 1
            source = store.local_path(row.storage_path, row.sha256)
            header, _ = deidentified_header(source, uids)  # the DICOMDIR's records come from headers only
            # Type 1 in the SERIES and IMAGE records, Type 2 in the instance: invented for the record only.
            header.SeriesNumber = header.get("SeriesNumber") or 1
            header.InstanceNumber = header.get("InstanceNumber") or exported
            fileset.add(header)
            sources[str(header.SOPInstanceUID)] = source
        fileset.write(staging)
        for instance in fileset:
            name = "/".join(Path(instance.FileID).parts)
            with archive.open(name, "w", force_zip64=True) as out:
                for chunk in deidentified_chunks(sources[str(instance.SOPInstanceUID)], uids):
                    out.write(chunk)
        archive.write(Path(staging) / "DICOMDIR", "DICOMDIR")
        manifest = {
            "profile": METHOD,
            "attribute_table": f"DICOM PS3.15 Table E.1-1, edition {TABLE_EDITION}",
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
