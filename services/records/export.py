"""`GET /v1/records/{case_id}/export/deidentified`: the case's released images, de-identified, as one ZIP
with a DEIDENTIFICATION.json manifest (profile, method codes, how many had their pixels cleaned, how many were
withheld and why)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response
from pydicom.fileset import FileSet
from sqlmodel import col, select
from starlette.background import BackgroundTask

from services.auth.access import case_scope
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.http import is_head
from services.records.api import CaseId, SessionDep, SettingsDep
from services.records.deidentify import (
    BASIC_PROFILE_CODE,
    CLEAN_PIXEL_DATA_CODE,
    METHOD,
    TABLE_EDITION,
    PixelCleaning,
    UidMap,
    Withheld,
    deidentified_chunks,
    deidentified_header,
    may_export,
    pixel_cleaning,
    record_pixel_cleaning,
)
from services.records.models import FileKind, RecordFile, RecordRequest
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)
ATTACHMENT = {"Content-Disposition": 'attachment; filename="deidentified.zip"'}
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
def export_deidentified(
    case_id: CaseId, request: Request, session: SessionDep, settings: SettingsDep
) -> Response:
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
    if is_head(request):  # the GET would answer 200 with a ZIP; its length is known only once written
        return Response(media_type="application/zip", headers=ATTACHMENT)
    store = ObjectStore.for_settings(settings)
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="export-", suffix=".zip")
    os.close(fd)
    path = Path(name)
    try:
        exported, cleaned, withheld = _write_zip(path, rows, store)
    except ImageNotExported as exc:
        path.unlink(missing_ok=True)
        log.error("records.export_failed", case_id=case_id, position=exc.position, error=exc.error)
        raise HTTPException(500, str(exc)) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info(
        "records.export_deidentified",
        case_id=case_id,
        exported=exported,
        pixels_cleaned=cleaned,
        withheld=sum(withheld.values()),
    )
    return FileResponse(
        path,
        media_type="application/zip",
        filename="deidentified.zip",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


class ImageNotExported(Exception):
    """A released image that could not be read or de-identified: the export stops before its first byte is
    sent (the ZIP is written whole before it is answered), so no half-written archive goes out."""

    def __init__(self, position: int, total: int, exc: Exception) -> None:
        self.position, self.error = position, type(exc).__name__
        super().__init__(
            f"released image {position} of {total} could not be read or de-identified ({self.error}); "
            "nothing was exported. Check that image in the case's records, or report it to the records "
            "service's operators"
        )


def _write_zip(
    path: Path, rows: list[RecordFile], store: ObjectStore
) -> tuple[int, int, dict[Withheld, int]]:
    """An IHE PDI-style file-set: a DICOMDIR at the root, instances under PS3.10 file IDs (up to 8 upper-case
    letters, digits or underscores per component, no extension), so media importers and PACS read it."""
    uids = UidMap()
    exported = 0
    withheld: dict[Withheld, int] = {}
    fileset = FileSet()
    sources: dict[str, Path] = {}
    positions: dict[str, int] = {}  # each instance's place among the released images (named in an error)
    cleanings: dict[str, PixelCleaning] = {}
    with (
        tempfile.TemporaryDirectory(dir=store.tmp_dir) as staging,
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for position, row in enumerate(rows, start=1):
            source = store.local_path(row.storage_path, row.sha256)
            try:
                header, pixel_length = deidentified_header(source, uids)  # the DICOMDIR's records: headers
            except Exception as exc:
                raise ImageNotExported(position, len(rows), exc) from exc
            if not may_export(row.burned_in_annotation):
                cleaning = pixel_cleaning(header, pixel_length, source)
                if isinstance(cleaning, Withheld):
                    withheld[cleaning] = withheld.get(cleaning, 0) + 1
                    continue
                record_pixel_cleaning(header, cleaning)
                cleanings[str(header.SOPInstanceUID)] = cleaning
            exported += 1
            # Type 1 in the SERIES and IMAGE records, Type 2 in the instance: invented for the record only.
            header.SeriesNumber = header.get("SeriesNumber") or 1
            header.InstanceNumber = header.get("InstanceNumber") or exported
            fileset.add(header)
            sources[str(header.SOPInstanceUID)] = source
            positions[str(header.SOPInstanceUID)] = position
        fileset.write(staging)
        for instance in fileset:
            name = "/".join(Path(instance.FileID).parts)
            uid = str(instance.SOPInstanceUID)
            try:
                with archive.open(name, "w", force_zip64=True) as out:
                    for chunk in deidentified_chunks(sources[uid], uids, cleanings.get(uid)):
                        out.write(chunk)
            except Exception as exc:
                raise ImageNotExported(positions[uid], len(rows), exc) from exc
        archive.write(Path(staging) / "DICOMDIR", "DICOMDIR")
        manifest = {
            "profile": METHOD,
            "attribute_table": f"DICOM PS3.15 Table E.1-1, edition {TABLE_EDITION}",
            "method_codes": [
                dict(zip(("code_value", "coding_scheme", "code_meaning"), code, strict=True))
                for code in [BASIC_PROFILE_CODE] + ([CLEAN_PIXEL_DATA_CODE] if cleanings else [])
            ],
            "exported": exported,
            "pixels_cleaned": len(cleanings),
            "withheld": sum(withheld.values()),
            "withheld_reasons": [
                {"code": reason.value, "count": count, "reason": reason.reason}
                for reason, count in sorted(withheld.items())
            ],
            # What the manifest said before `withheld_reasons`, kept for the readers written against it.
            "withheld_reason": "; ".join(reason.reason for reason in sorted(withheld)) or None,
        }
        archive.writestr("DEIDENTIFICATION.json", json.dumps(manifest, indent=2))
    return exported, len(cleanings), withheld
