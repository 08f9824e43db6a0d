"""When a case's records are complete, and the `records.assembled` event that says so."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from sqlmodel import Session, col, select

from contracts.envelope import new_event
from contracts.events import RecordsAssembled
from contracts.models import OriginalReport, StudySummary
from services.common.amqp import EVENTS, enqueue
from services.common.db import utcnow
from services.records.classify import PDF_TYPE, pdf_text
from services.records.models import FileKind, RecordFile, RecordRequest
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)

SOURCE = "/services/records"
ULTRASOUND = "US"
MISSING_REPORT = "the original report (PDF or UTF-8 text)"
MISSING_ULTRASOUND = "an ultrasound image (a DICOM instance with Modality US)"


class DicomInstance(Protocol):
    kind: str
    modality: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    number_of_frames: int | None


def case_files(session: Session, case_id: str) -> list[RecordFile]:
    query = select(RecordFile).where(RecordFile.case_id == case_id).order_by(col(RecordFile.id))
    return list(session.exec(query).all())


def missing_items(files: Iterable[RecordFile]) -> list[str]:
    files = list(files)
    missing = []
    if not any(f.kind == FileKind.REPORT for f in files):
        missing.append(MISSING_REPORT)
    if not any(f.kind == FileKind.DICOM and f.modality == ULTRASOUND for f in files):
        missing.append(MISSING_ULTRASOUND)
    return missing


def summarize_study(instances: Iterable[DicomInstance]) -> StudySummary | None:
    """The ultrasound study with most instances (the first uploaded on a tie); None without any."""
    by_study: dict[str, dict[str, DicomInstance]] = {}
    for instance in instances:
        if instance.kind != FileKind.DICOM or instance.modality != ULTRASOUND:
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


def report_text(path: Path, content_type: str) -> str:
    if content_type == PDF_TYPE:
        return pdf_text(path)
    return path.read_text(encoding="utf-8-sig")


def assemble_if_complete(session: Session, request: RecordRequest, store: ObjectStore) -> bool:
    """Mark the records assembled and enqueue `records.assembled`, once, when the set is complete."""
    if request.assembled_at is not None:
        return False
    files = case_files(session, request.case_id)
    study = summarize_study(files)
    if missing_items(files) or study is None:
        return False
    report = next(f for f in files if f.kind == FileKind.REPORT)
    assembled = RecordsAssembled(
        case_id=request.case_id,
        report=OriginalReport(
            content_type=report.content_type,
            sha256=report.sha256,
            text=report_text(store.path(report.storage_path), report.content_type),
        ),
        study=study,
        file_count=len(files),
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
