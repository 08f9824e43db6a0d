"""When a case's records are complete, and the `records.assembled` event that says so."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from sqlmodel import Session, col, select

from contracts.envelope import new_event
from contracts.events import RecordsAssembled, RecordsIncomplete
from contracts.models import OriginalReport, StudySummary
from services.common.amqp import EVENTS, enqueue
from services.common.db import utcnow
from services.records.adequacy import (
    MISSING_REPORT,
    MISSING_ULTRASOUND,
    STRUCTURED_REPORT,
    ULTRASOUND,
    Adequacy,
    assess,
    is_ultrasound_image,
)
from services.records.classify import DICOM_TYPE, PDF_TYPE, pdf_text
from services.records.fhir_records import FHIR_TYPE, diagnostic_report_text
from services.records.models import FileKind, RecordFile, RecordRequest
from services.records.store import ObjectStore
from services.records.structured_report import sr_text

__all__ = [
    "MISSING_REPORT",
    "MISSING_ULTRASOUND",
    "assemble_if_complete",
    "case_files",
    "missing_items",
    "report_text",
    "summarize_study",
]

log = structlog.get_logger(__name__)

SOURCE = "/services/records"


class DicomInstance(Protocol):
    kind: str
    modality: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    number_of_frames: int | None


def case_files(session: Session, case_id: str, *, released_only: bool = True) -> list[RecordFile]:
    """The case's files; by default only those released (an import held for identity is not)."""
    query = select(RecordFile).where(RecordFile.case_id == case_id)
    if released_only:
        query = query.where(col(RecordFile.released).is_(True))
    return list(session.exec(query.order_by(col(RecordFile.id))).all())


def missing_items(files: Iterable[RecordFile], exam: dict[str, str] | None = None) -> list[str]:
    return assess(files, exam).missing


def summarize_study(instances: Iterable[DicomInstance]) -> StudySummary | None:
    """The ultrasound study with most instances (the first uploaded on a tie); None without any."""
    by_study: dict[str, dict[str, DicomInstance]] = {}
    for instance in instances:
        if not is_ultrasound_image(instance):
            continue
        if instance.study_instance_uid and instance.sop_instance_uid:
            # The same SOP instance uploaded twice (e.g. re-exported with other bytes) counts once.
            by_study.setdefault(instance.study_instance_uid, {}).setdefault(
                instance.sop_instance_uid, instance
            )
    if not by_study:
        return None
    counts = Counter({uid: len(sops) for uid, sops in by_study.items()})
    study_uid = max(by_study, key=counts.__getitem__)
    chosen: Sequence[DicomInstance] = list(by_study[study_uid].values())
    return StudySummary(
        study_instance_uid=study_uid,
        modality=ULTRASOUND,
        instance_count=len(chosen),
        multiframe_count=sum(1 for i in chosen if (i.number_of_frames or 1) > 1),
        series_count=len({i.series_instance_uid for i in chosen}),
    )


def first_report(files: Sequence[RecordFile]) -> RecordFile:
    """The original report: a PDF, text or FHIR report first, else a DICOM Structured Report."""
    reports = [f for f in files if f.kind == FileKind.REPORT]
    reports += [f for f in files if f.kind == FileKind.DICOM and f.modality == STRUCTURED_REPORT]
    return reports[0]


def report_text(path: Path, content_type: str) -> str:
    if content_type == DICOM_TYPE:
        return sr_text(path)
    if content_type == PDF_TYPE:
        return pdf_text(path)
    if content_type == FHIR_TYPE:
        return diagnostic_report_text(path)
    return path.read_text(encoding="utf-8-sig")


def assemble_if_complete(session: Session, request: RecordRequest, store: ObjectStore) -> bool:
    """Assess the released files; enqueue `records.assembled` once when complete, else `records.incomplete`
    once per distinct set of missing items."""
    if request.assembled_at is not None or request.cancelled_at is not None:
        return False
    files = case_files(session, request.case_id)
    adequacy = assess(files, request.exam)
    request.adequacy = adequacy.model_dump()
    session.add(request)
    study = summarize_study(files)
    if adequacy.missing or study is None:
        if files:
            _enqueue_incomplete(session, request.case_id, adequacy)
        return False
    report = first_report(files)
    assembled = RecordsAssembled(
        case_id=request.case_id,
        report=OriginalReport(
            content_type=report.content_type,
            sha256=report.sha256,
            text=report_text(store.path(report.storage_path), report.content_type),
        ),
        study=study,
        file_count=len(files),
        warnings=adequacy.warnings,
    )
    request.assembled_at = utcnow()
    session.add(request)
    enqueue(
        session,
        EVENTS,
        new_event(
            id=f"records.assembled:{request.case_id}", source=SOURCE, subject=request.case_id, data=assembled
        ),
    )
    log.info(
        "records.assembled",
        case_id=request.case_id,
        file_count=len(files),
        instance_count=study.instance_count,
        series_count=study.series_count,
    )
    return True


def _enqueue_incomplete(session: Session, case_id: str, adequacy: Adequacy) -> None:
    # One event per distinct missing set: a re-upload that changes nothing publishes nothing.
    key = "|".join(adequacy.missing)
    incomplete = RecordsIncomplete(case_id=case_id, missing=adequacy.missing, warnings=adequacy.warnings)
    event_id = f"records.incomplete:{case_id}:{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    enqueue(session, EVENTS, new_event(id=event_id, source=SOURCE, subject=case_id, data=incomplete))
