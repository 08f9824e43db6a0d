"""Completeness and technical adequacy of an ultrasound case's records, as the specialist sees them.

`missing` blocks assembly (and drives reminders); `warnings` travel with `records.assembled`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from services.records.models import FileKind, RecordFile

ULTRASOUND = "US"
MISSING_REPORT = "the original report (PDF or UTF-8 text)"
MISSING_ULTRASOUND = "an ultrasound image (a DICOM instance with Modality US)"
MISSING_CINE = "a cine clip (a multi-frame ultrasound instance), which this exam type needs"
# Cine is what a second reader needs to judge a heart or a fetus; for other exams it is recommended.
CINE_REQUIRED = frozenset({"obstetric", "fetal_echo", "echocardiography"})
CINE_RECOMMENDED = frozenset({"pelvic", "breast", "thyroid", "abdominal", "vascular", "renal", "scrotal"})


class Adequacy(BaseModel):
    report_present: bool
    ultrasound_instances: int
    other_modality_instances: int
    cine_clips: int
    cine_expected: str  # "required" | "recommended" | "not_expected"
    calibrated_instances: int
    burned_in_annotation_instances: int
    missing: list[str]
    warnings: list[str]


def cine_expectation(exam_type: str | None) -> str:
    key = (exam_type or "").strip().lower()
    if key in CINE_REQUIRED:
        return "required"
    return "recommended" if key in CINE_RECOMMENDED else "not_expected"


def assess(files: Iterable[RecordFile], exam: dict[str, Any] | None = None) -> Adequacy:
    files = list(files)
    us = [f for f in files if f.kind == FileKind.DICOM and f.modality == ULTRASOUND]
    others = [f for f in files if f.kind == FileKind.DICOM and f.modality != ULTRASOUND]
    cine = [f for f in us if (f.number_of_frames or 1) > 1]
    calibrated = [f for f in us if f.has_regions]
    burned_in = [f for f in us if f.burned_in_annotation == "YES"]
    expected = cine_expectation((exam or {}).get("exam_type"))
    report_present = any(f.kind == FileKind.REPORT for f in files)
    missing = []
    if not report_present:
        missing.append(MISSING_REPORT)
    if not us:
        missing.append(MISSING_ULTRASOUND)
    elif not cine and expected == "required":
        missing.append(MISSING_CINE)
    warnings = []
    if us and not cine and expected == "recommended":
        warnings.append("no cine clip: the second reader sees still images only")
    uncalibrated = sum(1 for f in us if f.has_regions is False)
    if uncalibrated:
        warnings.append(
            f"{uncalibrated} of {len(us)} ultrasound instance(s) have no calibrated region "
            "(Sequence of Ultrasound Regions): distances cannot be measured on them"
        )
    if burned_in:
        warnings.append(
            f"{len(burned_in)} ultrasound instance(s) carry burned-in annotation (patient data in the pixels)"
        )
    if others:
        warnings.append(
            f"{len(others)} instance(s) are not ultrasound and are not part of the reviewed study"
        )
    return Adequacy(
        report_present=report_present,
        ultrasound_instances=len(us),
        other_modality_instances=len(others),
        cine_clips=len(cine),
        cine_expected=expected,
        calibrated_instances=len(calibrated),
        burned_in_annotation_instances=len(burned_in),
        missing=missing,
        warnings=warnings,
    )
