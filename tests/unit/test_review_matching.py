from __future__ import annotations

from datetime import UTC, datetime

import pytest

from contracts.commands import MatchSpecialist
from services.review.matching import Assignment, NoMatch, match_specialist, preferred_subspecialties
from services.review.models import Specialist


def specialist(
    id: str,
    subspecialties: list[str],
    states: list[str],
    *,
    academic: bool = False,
    limit: int = 5,
    active: bool = True,
) -> Specialist:
    return Specialist(
        id=id,
        display_name=id,
        credentials="MD",
        npi="1234567893",
        subspecialties=subspecialties,
        licensed_states=states,
        organization="Org",
        academic=academic,
        max_open_reviews=limit,
        active=active,
    )


DIRECTORY = [
    specialist("gyn-a", ["gynecologic_imaging", "body_imaging"], ["CA"], academic=True),
    specialist("gyn-b", ["gynecologic_imaging"], ["CA", "NY"]),
    specialist("body-a", ["body_imaging"], ["CA", "TX"], academic=True),
    specialist("mfm-a", ["maternal_fetal_medicine"], ["CA", "TX"], limit=2),
    specialist("neck-a", ["neuroradiology_head_neck"], ["CA"]),
    specialist("breast-a", ["breast_imaging"], ["NY"]),
    specialist("msk-retired", ["musculoskeletal"], ["CA"], active=False),
]


def request(
    exam_type: str,
    state: str,
    *,
    reason: str = "possible_malignancy",
    hint: str = "",
    exclude: tuple[str, ...] = (),
) -> MatchSpecialist:
    return MatchSpecialist.model_validate(
        {
            "case_id": "case-1",
            "exam": {"exam_type": exam_type, "performed_on": "2025-03-01", "facility": "Mercy"},
            "patient": {
                "family_name": "Doe",
                "given_name": "Jane",
                "birth_date": "1980-01-01",
                "sex": "female",
                "mrn": "M1",
                "state": state,
            },
            "referring": {"name": "Dr Ref", "npi": "1234567893", "organization": "Clinic"},
            "urgency": "standard",
            "subspecialty_hint": hint,
            "clinical_question": "Is the mass malignant?",
            "reason": reason,
            "due_at": datetime(2025, 3, 10, tzinfo=UTC),
            "original_report": {"content_type": "text/plain", "sha256": "0" * 64, "text": "Report."},
            "study": {
                "study_instance_uid": "1.2.3",
                "modality": "US",
                "instance_count": 1,
                "multiframe_count": 0,
                "series_count": 1,
            },
            "exclude_reviewers": list(exclude),
        }
    )


@pytest.mark.parametrize(
    ("case", "open_reviews", "reviewer", "subspecialty"),
    [
        pytest.param(
            request("pelvic", "CA"), {}, "gyn-a", "gynecologic_imaging", id="pelvic->gyn, academic wins tie"
        ),
        pytest.param(
            request("pelvic", "CA"),
            {"gyn-a": 2, "gyn-b": 1},
            "gyn-b",
            "gynecologic_imaging",
            id="fewer open reviews before academic",
        ),
        pytest.param(
            request("pelvic", "CA"),
            {"gyn-a": 5, "gyn-b": 5},
            "body-a",
            "body_imaging",
            id="gyn at capacity -> body imaging",
        ),
        pytest.param(request("pelvic", "NY"), {}, "gyn-b", "gynecologic_imaging", id="licensure filter"),
        pytest.param(
            request("pelvic", "CA", exclude=("gyn-a",)),
            {},
            "gyn-b",
            "gynecologic_imaging",
            id="excluded reviewer skipped",
        ),
        pytest.param(
            request("obstetric", "TX", reason="fetal_anomaly"),
            {},
            "mfm-a",
            "maternal_fetal_medicine",
            id="obstetric fetal anomaly -> MFM",
        ),
        pytest.param(
            request("pelvic", "CA", reason="fetal_anomaly"),
            {},
            "mfm-a",
            "maternal_fetal_medicine",
            id="fetal anomaly overrides exam type",
        ),
        pytest.param(
            request("thyroid", "CA"), {}, "neck-a", "neuroradiology_head_neck", id="thyroid->head/neck"
        ),
        pytest.param(
            request("thyroid", "CA", hint="body_imaging"),
            {},
            "body-a",
            "body_imaging",
            id="allowed hint goes first",
        ),
        pytest.param(
            request("pelvic", "CA", hint="breast_imaging"),
            {},
            "gyn-a",
            "gynecologic_imaging",
            id="hint outside the exam's list ignored",
        ),
        pytest.param(request("elbow", "TX"), {}, "body-a", "body_imaging", id="unknown exam -> body imaging"),
    ],
)
def test_assigns_the_best_candidate(
    case: MatchSpecialist, open_reviews: dict[str, int], reviewer: str, subspecialty: str
) -> None:
    result = match_specialist(case, DIRECTORY, open_reviews)

    assert isinstance(result, Assignment), result
    assert (result.specialist.id, result.subspecialty) == (reviewer, subspecialty)


@pytest.mark.parametrize(
    ("case", "open_reviews", "subspecialty", "reason_says"),
    [
        pytest.param(
            request("breast", "CA"), {}, "breast_imaging", "is licensed in CA", id="nobody licensed"
        ),
        pytest.param(
            request("musculoskeletal", "CA"),
            {},
            "musculoskeletal",
            "no active specialist reads",
            id="only an inactive reader",
        ),
        pytest.param(
            request("obstetric", "CA"),
            {"mfm-a": 2},
            "maternal_fetal_medicine",
            "open-review limit (mfm-a 2 of 2)",
            id="everyone at capacity",
        ),
        pytest.param(
            request("obstetric", "TX", exclude=("mfm-a",)),
            {},
            "maternal_fetal_medicine",
            "excluded for this case (mfm-a)",
            id="everyone excluded",
        ),
    ],
)
def test_no_candidate_gives_the_reason(
    case: MatchSpecialist, open_reviews: dict[str, int], subspecialty: str, reason_says: str
) -> None:
    result = match_specialist(case, DIRECTORY, open_reviews)

    assert isinstance(result, NoMatch), result
    assert result.subspecialty == subspecialty
    assert reason_says in result.reason


def test_explanation_names_rule_licence_and_load() -> None:
    result = match_specialist(request("pelvic", "CA"), DIRECTORY, {"gyn-b": 1})

    assert isinstance(result, Assignment)
    assert result.explanation.startswith(
        "gyn-a: exam 'pelvic' -> gynecologic_imaging; licensed in CA; 0 of 5 open reviews; academic centre"
    )


def test_explanation_says_why_the_second_choice_was_taken() -> None:
    result = match_specialist(request("pelvic", "CA"), DIRECTORY, {"gyn-a": 5, "gyn-b": 5})

    assert isinstance(result, Assignment)
    assert "exam 'pelvic' -> body_imaging (no gynecologic_imaging candidate)" in result.explanation


def test_fetal_anomaly_rule_is_named() -> None:
    result = match_specialist(request("obstetric", "TX", reason="fetal_anomaly"), DIRECTORY, {})

    assert isinstance(result, Assignment)
    assert "reason 'fetal_anomaly' -> maternal_fetal_medicine" in result.explanation


def test_preference_keeps_every_allowed_subspecialty_once() -> None:
    assert preferred_subspecialties("pelvic", "unclear_report", "body_imaging") == (
        "body_imaging",
        "gynecologic_imaging",
    )
    assert preferred_subspecialties("Pelvic", "unclear_report", "") == ("gynecologic_imaging", "body_imaging")
