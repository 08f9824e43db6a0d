"""`GET /v1/records/{case_id}/timeline`: the case's released records in date order (undated ones last),
one entry per imaging study and per report, note or result; descriptions carry no PHI."""

from __future__ import annotations

from datetime import date, datetime

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from services.records.api import CaseId, SessionDep
from services.records.assembly import case_files
from services.records.classify import PDF_TYPE
from services.records.models import FileKind, RecordFile, RecordRequest

router = APIRouter(prefix="/v1/records", tags=["records"])


class TimelineEntry(BaseModel):
    date: date | None
    category: str  # "imaging_study" | "report" | "clinical"
    record_type: str
    description: str
    study_instance_uid: str | None = None
    sha256: str | None = None


@router.get("/{case_id}/timeline", responses={404: {"description": "no records request for this case"}})
def get_timeline(case_id: CaseId, session: SessionDep) -> list[TimelineEntry]:
    if session.get(RecordRequest, case_id) is None:
        raise HTTPException(404, "no records were requested for this case; check the case id")
    files = case_files(session, case_id)
    entries = [_study_entry(uid, members) for uid, members in _studies(files).items()]
    entries += [_document_entry(f) for f in files if f.kind in (FileKind.REPORT, FileKind.CLINICAL)]
    return sorted(entries, key=lambda e: (e.date is None, e.date or date.min, e.category))


def _studies(files: list[RecordFile]) -> dict[str, list[RecordFile]]:
    studies: dict[str, list[RecordFile]] = {}
    for f in files:
        if f.kind == FileKind.DICOM and f.study_instance_uid:
            studies.setdefault(f.study_instance_uid, []).append(f)
    return studies


def _study_entry(uid: str, members: list[RecordFile]) -> TimelineEntry:
    modalities = "/".join(sorted({m.modality or "?" for m in members}))
    clips = sum(1 for m in members if (m.number_of_frames or 1) > 1)
    dates = sorted(d for d in (_dicom_date(m.study_date) for m in members) if d)
    return TimelineEntry(
        date=dates[0] if dates else None,
        category="imaging_study",
        record_type=f"{modalities} study",
        description=f"{len(members)} instance(s), {clips} cine clip(s), "
        f"{len({m.series_instance_uid for m in members})} series",
        study_instance_uid=uid,
    )


def _document_entry(f: RecordFile) -> TimelineEntry:
    record_type = f.record_type or ("PDF report" if f.content_type == PDF_TYPE else "text report")
    category = "report" if f.kind == FileKind.REPORT else "clinical"
    return TimelineEntry(
        date=f.record_date,
        category=category,
        record_type=record_type,
        description=f"{record_type}, {f.size_bytes} bytes",
        sha256=f.sha256,
    )


def _dicom_date(value: str | None) -> date | None:
    try:
        return datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return None
