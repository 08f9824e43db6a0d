"""What a radiologist signs: lexicon categories that exist and fit the exam, RADPEER's 2016 scale, a critical
result documented as communicated, the facts of the case on the report, no reader from the scanning site."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.models import DocumentedCommunication
from services.review.diagnostic_report import conclusion
from services.review.matching import match_specialist
from services.review.models import ReviewFindings, RiskAssessment
from services.review.report_pdf import Addendum, render_report_pdf
from tests.unit.test_review_matching import request, specialist
from tests.unit.test_review_report import content, pdf_text

BASE: dict[str, Any] = {
    "technical_quality": "diagnostic",
    "findings": "Findings.",
    "impression": "Impression.",
    "recommendations": ["Follow-up in 6 weeks."],
    "new_ultrasound_needed": False,
}


def test_radpeer_uses_the_2016_scale_and_b_means_a_major_discrepancy() -> None:
    with pytest.raises(ValidationError):
        ReviewFindings(**BASE, agreement="major_discrepancy", radpeer_score="4b")  # retired in 2016
    major_but_a = ReviewFindings(**BASE, agreement="major_discrepancy", radpeer_score="2a")
    assert [field for field, _ in major_but_a.submission_problems("pelvic")] == ["radpeer_score"]
    minor_but_b = ReviewFindings(**BASE, agreement="minor_discrepancy", radpeer_score="3b")
    assert [field for field, _ in minor_but_b.submission_problems("pelvic")] == ["agreement"]
    assert not ReviewFindings(**BASE, agreement="major_discrepancy", radpeer_score="3b").submission_problems(
        "pelvic"
    )


@pytest.mark.parametrize(
    "assessment",
    [
        {"system": "bi_rads_us", "category": "4A"},
        {"system": "acr_ti_rads", "category": "TR5", "points": 7},
        {"system": "o_rads_us_2022", "category": "3", "lesion": "right ovary"},
        {"system": "li_rads_us_2017", "category": "US-2", "visualization": "B"},
    ],
)
def test_the_lexicons_categories_are_taken(assessment: dict[str, Any]) -> None:
    assert RiskAssessment(**assessment).category == assessment["category"]


@pytest.mark.parametrize(
    "assessment",
    [
        {"system": "acr_ti_rads", "category": "TR4", "points": 3},  # TR4 is 4-6 points
        {"system": "acr_ti_rads", "category": "TR3"},  # TI-RADS needs its points
        {"system": "o_rads_us_2022", "category": "6"},
        {"system": "bi_rads_us", "category": "4D"},
        {"system": "li_rads_us_2017", "category": "US-3"},  # no visualization score
    ],
)
def test_a_category_the_lexicon_does_not_define_is_refused(assessment: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RiskAssessment(**assessment)


def test_a_lexicon_must_fit_the_exam() -> None:
    thyroid = ReviewFindings(
        **BASE,
        agreement="concordant",
        assessments=[{"system": "acr_ti_rads", "category": "TR5", "points": 8}],
    )
    assert thyroid.submission_problems("pelvic") == [
        ("assessments.0.system", "acr_ti_rads applies to thyroid, neck exams")
    ]
    assert not thyroid.submission_problems("thyroid")


def test_a_critical_result_must_say_who_was_told_and_the_report_shows_it() -> None:
    untold = ReviewFindings(**BASE, agreement="major_discrepancy", critical_result=True)
    assert [field for field, _ in untold.submission_problems("pelvic")] == ["communication"]
    told = {
        "recipient": "Dr Ref (referring)",
        "method": "telephone",
        "at": "2026-12-06T09:05:00-05:00",
        "read_back": True,
    }
    findings = ReviewFindings(**BASE, agreement="major_discrepancy", critical_result=True, communication=told)
    text = pdf_text(render_report_pdf(dataclasses.replace(content(), findings=findings)))
    assert "Critical result communicated by telephone to Dr Ref (referring) at 2026-12-06 14:05 UTC" in text


def test_a_major_discrepancy_the_specialist_documented_as_communicated_is_on_the_report() -> None:
    told = {"recipient": "Dr Ref", "method": "in_person", "at": "2026-12-06T14:05:00Z"}
    findings = ReviewFindings(**BASE, agreement="major_discrepancy", communication=told)
    text = pdf_text(render_report_pdf(dataclasses.replace(content(), findings=findings)))
    assert "Major discrepancy communicated in person to Dr Ref at 2026-12-06 14:05 UTC by Elena" in text


def test_a_communication_operations_documented_is_on_the_pdf_and_the_diagnostic_report() -> None:
    documented = DocumentedCommunication(
        recipient="Dr. Alex Kim",
        recipient_role="referring physician",
        method="telephone",
        at=datetime(2026, 12, 6, 9, 5, tzinfo=timezone(timedelta(hours=-5))),
        read_back=True,
        documented_by="nurse-12",
        documented_at=datetime(2026, 12, 6, 14, 30, tzinfo=UTC),
    )
    report = dataclasses.replace(content(), communication=documented)
    said = (
        "Major discrepancy communicated by telephone to Dr. Alex Kim (referring physician) at 2026-12-06 14:05 "
        "UTC (read back); documented by nurse-12 at 2026-12-06 14:30 UTC."
    )
    assert said in pdf_text(render_report_pdf(report))
    assert conclusion(report).endswith(f"\n\n{said}")
    assert "communicated" not in conclusion(content())  # nothing is said when nobody needed telling


def test_the_report_shows_the_pregnancy_the_planned_procedure_and_its_addenda() -> None:
    base = content()
    pregnant = base.request.model_copy(
        update={"gestational_age_weeks": 22, "procedure_scheduled_on": date(2025, 3, 9)}
    )
    addendum = Addendum("No.", datetime(2025, 3, 6, 9, tzinfo=UTC), question="Is MRI needed?")
    text = pdf_text(render_report_pdf(dataclasses.replace(base, request=pregnant, addenda=(addendum,))))
    for expected in (
        "Gestational age 22 weeks",
        "Planned procedure 2025-03-09",
        "Images reviewed",
        "Addended",
    ):
        assert expected in text, expected


def test_a_specialist_from_the_site_of_the_first_scan_is_not_matched() -> None:
    mercy = specialist("gyn-mercy", ["gynecologic_imaging"], ["CA"], organization="Mercy", academic=True)
    other = specialist("gyn-other", ["gynecologic_imaging"], ["CA"], organization="Elsewhere")
    chosen = match_specialist(request("pelvic", "CA"), [mercy, other], {}).specialist
    assert chosen is not None and chosen.id == "gyn-other"
