"""Recommendations with a structured follow-up (what, and when), beside the plain strings stored reviews hold."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

from services.review.diagnostic_report import build_diagnostic_report
from services.review.models import ReviewFindings
from services.review.recommendations import Recommendation, describe
from services.review.report_pdf import render_report_pdf
from tests.unit.test_review_report import content, pdf_text

PELVIC_FOLLOW_UP = {
    "text": "Follow-up pelvic ultrasound",
    "follow_up": {"action": "ultrasound", "when": {"value": 6, "up_to": 12, "unit": "weeks"}},
}


@pytest.mark.parametrize(
    ("item", "line"),
    [
        ("Repeat pelvic ultrasound in 8 to 12 weeks.", "Repeat pelvic ultrasound in 8 to 12 weeks."),
        (PELVIC_FOLLOW_UP, "Follow-up pelvic ultrasound (ultrasound in 6–12 weeks)."),
        ({"follow_up": {"action": "mri", "when": {"unit": "now"}}}, "MRI now."),
        ({"follow_up": {"action": "biopsy", "when": {"value": 1, "unit": "months"}}}, "Biopsy in 1 month."),
        ({"text": "Referral to gynecologic oncology."}, "Referral to gynecologic oncology."),
    ],
)
def test_a_recommendation_is_a_string_or_carries_a_follow_up(item: Any, line: str) -> None:
    findings = ReviewFindings.model_validate(
        {
            "technical_quality": "diagnostic",
            "agreement": "concordant",
            "findings": "F.",
            "impression": "I.",
            "recommendations": [item],
            "new_ultrasound_needed": False,
        }
    )
    assert describe(findings.recommendations[0]) == line
    # Stored as JSON and read back (ReviewFindings.of): a string stays a string, a structure a structure.
    again = ReviewFindings.model_validate(findings.model_dump(mode="json"))
    assert again.recommendations == findings.recommendations


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ({"value": 0, "unit": "weeks"}, "positive value"),
        ({"value": -3, "unit": "months"}, "positive value"),
        ({"unit": "weeks"}, "positive value"),
        ({"value": 6, "unit": "fortnights"}, "'now', 'days', 'weeks', 'months' or 'years'"),
        ({"value": 12, "up_to": 6, "unit": "weeks"}, "more than value"),
        ({"value": 3, "unit": "now"}, "'now' takes no value"),
        ({"value": 40, "unit": "years"}, "at most 10 years"),
    ],
)
def test_an_interval_is_positive_in_a_known_unit(when: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Recommendation.model_validate({"follow_up": {"action": "ultrasound", "when": when}})


def test_an_empty_or_unknown_recommendation_is_refused() -> None:
    with pytest.raises(ValidationError, match="its text, a follow_up, or both"):
        Recommendation.model_validate({})
    with pytest.raises(ValidationError, match="Input should be"):
        Recommendation.model_validate({"follow_up": {"action": "acupuncture", "when": {"unit": "now"}}})


def test_the_pdf_and_the_diagnostic_report_show_the_follow_up() -> None:
    base = content()
    findings = base.findings.model_copy(
        update={"recommendations": [Recommendation.model_validate(PELVIC_FOLLOW_UP), "No surgery now."]}
    )
    report_content = dataclasses.replace(base, findings=findings)
    pdf = render_report_pdf(report_content)

    text = pdf_text(pdf)
    resource = build_diagnostic_report(
        report_id="r1", content=report_content, pdf=pdf, pdf_url="http://r/pdf", issued=base.signed_at
    )

    assert "Follow-up pelvic ultrasound (ultrasound in 6–12 weeks)." in text and "No surgery now." in text
    report = DiagnosticReport.model_validate(resource)
    assert report.conclusion is not None
    assert "- Follow-up pelvic ultrasound (ultrasound in 6–12 weeks).\n- No surgery now." in report.conclusion
    assert "extension" not in resource and "contained" not in resource
