"""The second opinion in plain language for the patient. It never carries the RADPEER score: that is for
the programme's quality assurance, not for the patient."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel

from services.review.models import ReviewFindings
from services.review.recommendations import describe
from services.review.report_pdf import ADDENDUM_KIND_LABELS

AGREEMENT_PLAIN = {
    "concordant": "The specialist agrees with the original report.",
    "minor_discrepancy": (
        "The specialist mostly agrees with the original report but sees some details differently."
    ),
    "major_discrepancy": (
        "The specialist reached a different conclusion from the original report. "
        "Please talk with your doctor about what this means for you."
    ),
}
QUALITY_PLAIN = {
    "diagnostic": "The images from your first scan were good enough for a full second opinion.",
    "limited": "The images from your first scan were only partly adequate, which limits what can be said.",
    "non_diagnostic": "The images from your first scan were not good enough to give a reliable opinion.",
}


class PatientSummary(BaseModel):
    case_id: str
    exam: str
    reviewer: str
    signed_at: datetime
    agreement: str
    image_quality: str
    conclusion: str
    next_steps: list[str]
    new_ultrasound_needed: bool
    answers_to_your_questions: str | None
    follow_up_answers: list[dict[str, str]]
    specialist_addenda: list[dict[str, str]] = []
    note: str = (
        "This summary explains the specialist's report in everyday words. "
        "Your doctor has the full report and will go through it with you."
    )


def patient_summary(
    *,
    case_id: str,
    exam_type: str,
    reviewer: str,
    signed_at: datetime,
    findings: ReviewFindings,
    follow_ups: list[tuple[str, str]],
    addenda: Sequence[tuple[str, str]] = (),
) -> PatientSummary:
    next_steps = [describe(item) for item in findings.recommendations]
    if findings.new_ultrasound_needed:
        next_steps.append("You will need a new ultrasound examination.")
    return PatientSummary(
        case_id=case_id,
        exam=f"{exam_type} ultrasound",
        reviewer=reviewer,
        signed_at=signed_at,
        agreement=AGREEMENT_PLAIN[findings.agreement],
        image_quality=QUALITY_PLAIN[findings.technical_quality],
        conclusion=findings.impression,
        next_steps=next_steps,
        new_ultrasound_needed=findings.new_ultrasound_needed,
        answers_to_your_questions=findings.patient_answers,
        follow_up_answers=[{"question": q, "answer": a} for q, a in follow_ups],
        # What the specialist added later on their own (e.g. a correction), as the report prints it.
        specialist_addenda=[{"kind": ADDENDUM_KIND_LABELS.get(k, "Addendum"), "text": t} for k, t in addenda],
    )
