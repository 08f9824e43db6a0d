"""Subspecialties and the reasons for a second opinion: the vocabulary intake and review share."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum


class Subspecialty(StrEnum):
    BODY = "body_imaging"
    GYNECOLOGIC = "gynecologic_imaging"
    MATERNAL_FETAL = "maternal_fetal_medicine"
    BREAST = "breast_imaging"
    VASCULAR = "vascular"
    PEDIATRIC = "pediatric"
    MUSCULOSKELETAL = "musculoskeletal"
    HEAD_NECK = "neuroradiology_head_neck"


class Reason(StrEnum):
    POSSIBLE_MALIGNANCY = "possible_malignancy"
    FETAL_ANOMALY = "fetal_anomaly"
    VASCULAR_FINDING = "vascular_finding"
    UNCLEAR_REPORT = "unclear_report"
    DOUBTS_ABOUT_FIRST_SCAN = "doubts_about_first_scan"
    INVASIVE_PROCEDURE_PLANNED = "invasive_procedure_planned"


# Exam type -> subspecialties that may read it, best first.
EXAM_SUBSPECIALTIES: dict[str, tuple[Subspecialty, ...]] = {
    "pelvic": (Subspecialty.GYNECOLOGIC, Subspecialty.BODY),
    "transvaginal": (Subspecialty.GYNECOLOGIC, Subspecialty.BODY),
    "obstetric": (Subspecialty.MATERNAL_FETAL,),
    "fetal": (Subspecialty.MATERNAL_FETAL,),
    "breast": (Subspecialty.BREAST,),
    "thyroid": (Subspecialty.HEAD_NECK, Subspecialty.BODY),
    "neck": (Subspecialty.HEAD_NECK,),
    "abdominal": (Subspecialty.BODY,),
    "renal": (Subspecialty.BODY,),
    "liver": (Subspecialty.BODY,),
    "scrotal": (Subspecialty.BODY,),
    "vascular": (Subspecialty.VASCULAR,),
    "carotid": (Subspecialty.VASCULAR,),
    "venous": (Subspecialty.VASCULAR,),
    "musculoskeletal": (Subspecialty.MUSCULOSKELETAL,),
    "pediatric": (Subspecialty.PEDIATRIC,),
}

EXAM_TYPES = tuple(sorted(EXAM_SUBSPECIALTIES))


def subspecialties_for(exam_type: str, reason: str | None = None) -> tuple[Subspecialty, ...]:
    """The subspecialties that may read `exam_type`; a fetal anomaly always goes to maternal-fetal medicine."""
    if reason == Reason.FETAL_ANOMALY:
        return (Subspecialty.MATERNAL_FETAL,)
    return EXAM_SUBSPECIALTIES.get(exam_type.lower(), (Subspecialty.BODY,))


def add_business_days(start: datetime, days: int) -> datetime:
    """`days` working days (Monday to Friday) after `start`, at the same time of day."""
    current = start
    added = 0
    while added < days:
        current += timedelta(days=1)
        if current.weekday() < 5:
            added += 1
    return current


# Business days from records complete to the due date, by urgency; urgent cases keep their fixed due date.
BUSINESS_DAYS_AFTER_RECORDS = {"standard": 5, "priority": 2}
