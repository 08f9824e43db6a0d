"""Completeness and technical adequacy of an ultrasound case's records, as the specialist sees them.

`missing` blocks assembly (and drives reminders); `warnings` travel with `records.assembled`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from services.records.models import FileKind, RecordFile

ULTRASOUND = "US"
STRUCTURED_REPORT = "SR"
RAW_DATA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66"


def is_ultrasound_image(instance: Any) -> bool:
    """An ultrasound instance a reader can look at: Modality US, but not the cart vendor's Raw Data, which
    carries Modality US and no image."""
    return (
        instance.kind == FileKind.DICOM
        and instance.modality == ULTRASOUND
        and getattr(instance, "sop_class_uid", None) != RAW_DATA_SOP_CLASS
    )


MISSING_REPORT = "the original report (PDF, UTF-8 text, DICOM SR or FHIR DiagnosticReport)"
MISSING_ULTRASOUND = "an ultrasound image (a DICOM instance with Modality US)"
MISSING_CINE = "a cine clip (a multi-frame ultrasound instance), which this exam type needs"
# Cine is what a second reader needs to judge a heart or a fetus; for other exams it is recommended.
CINE_REQUIRED = frozenset({"obstetric", "fetal_echo", "echocardiography"})
CINE_RECOMMENDED = frozenset({"pelvic", "breast", "thyroid", "abdominal", "vascular", "renal", "scrotal"})


# The standard views of an exam type (after the ACR-AIUM practice parameters), each matched when an
# instance's view label (ViewCodeSequence, ImageComments, SeriesDescription) holds one of its word sets.
VIEW_CHECKLISTS: dict[str, list[tuple[str, tuple[tuple[str, ...], ...]]]] = {
    "pelvic": [
        ("uterus, sagittal", (("uterus", "sag"), ("uterus", "long"))),
        ("uterus, transverse", (("uterus", "trans"),)),
        ("endometrium", (("endometri",),)),
        ("right ovary", (("right", "ovary"), ("rt", "ov"))),
        ("left ovary", (("left", "ovary"), ("lt", "ov"))),
    ],
    "thyroid": [
        ("right lobe, transverse", (("right", "trans"), ("rt", "trans"))),
        ("right lobe, sagittal", (("right", "sag"), ("rt", "sag"), ("right", "long"), ("rt", "long"))),
        ("left lobe, transverse", (("left", "trans"), ("lt", "trans"))),
        ("left lobe, sagittal", (("left", "sag"), ("lt", "sag"), ("left", "long"), ("lt", "long"))),
        ("isthmus", (("isthmus",),)),
    ],
    "renal": [
        (
            "right kidney, longitudinal",
            (("right", "kidney", "long"), ("rt", "kid", "long"), ("right", "kidney", "sag")),
        ),
        ("right kidney, transverse", (("right", "kidney", "trans"), ("rt", "kid", "trans"))),
        (
            "left kidney, longitudinal",
            (("left", "kidney", "long"), ("lt", "kid", "long"), ("left", "kidney", "sag")),
        ),
        ("left kidney, transverse", (("left", "kidney", "trans"), ("lt", "kid", "trans"))),
        ("urinary bladder", (("bladder",),)),
    ],
    "obstetric": [
        ("fetal head (biparietal diameter)", (("bpd",), ("head",), ("biparietal",))),
        ("fetal abdomen (abdominal circumference)", (("ac",), ("abdom",))),
        ("femur length", (("fl",), ("femur",))),
        ("four-chamber heart", (("4ch",), ("four", "chamber"), ("4", "chamber"))),
        ("placenta", (("placenta",),)),
    ],
    "carotid": [
        ("right common carotid", (("right", "cca"), ("rt", "cca"), ("right", "common", "carotid"))),
        ("right internal carotid", (("right", "ica"), ("rt", "ica"), ("right", "internal", "carotid"))),
        ("left common carotid", (("left", "cca"), ("lt", "cca"), ("left", "common", "carotid"))),
        ("left internal carotid", (("left", "ica"), ("lt", "ica"), ("left", "internal", "carotid"))),
    ],
}


def _words(label: str) -> set[str]:
    return {w for w in "".join(c if c.isalnum() else " " for c in label.lower()).split() if w}


def _shows(words: set[str], word_set: tuple[str, ...]) -> bool:
    # A word set matches when each of its words starts a word of the label ("sag" matches "sagittal").
    return all(any(w.startswith(part) for w in words) for part in word_set)


def missing_views(exam_type: str | None, labels: Iterable[str]) -> list[str] | None:
    """The checklist's views no instance shows; None when there is no checklist or no instance is labelled."""
    checklist = VIEW_CHECKLISTS.get((exam_type or "").strip().lower())
    labelled = [_words(label) for label in labels if label]
    if checklist is None or not labelled:
        return None
    return [
        view for view, word_sets in checklist if not any(_shows(w, ws) for w in labelled for ws in word_sets)
    ]


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
    us = [f for f in files if is_ultrasound_image(f)]
    structured = [f for f in files if f.kind == FileKind.DICOM and f.modality == STRUCTURED_REPORT]
    others = [
        f for f in files if f.kind == FileKind.DICOM and f.modality not in (ULTRASOUND, STRUCTURED_REPORT)
    ]
    cine = [f for f in us if (f.number_of_frames or 1) > 1]
    calibrated = [f for f in us if f.has_regions]
    burned_in = [f for f in us if f.burned_in_annotation == "YES"]
    expected = cine_expectation((exam or {}).get("exam_type"))
    report_present = any(f.kind == FileKind.REPORT for f in files) or bool(structured)
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
    exam_type = (exam or {}).get("exam_type")
    if us and exam_type in VIEW_CHECKLISTS:
        absent = missing_views(exam_type, [f.view_label or "" for f in us])
        if absent is None:
            warnings.append(
                f"the standard {exam_type} views cannot be checked: no instance names its view "
                "(ViewCodeSequence, ImageComments or SeriesDescription)"
            )
        elif absent:
            warnings.append(f"standard {exam_type} views not found: {', '.join(absent)}")
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
