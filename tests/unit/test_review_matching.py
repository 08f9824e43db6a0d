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
    npi: str = "1234567893",
    organization: str = "Org",
    networks: list[str] | None = None,
    away: list[tuple[str, str]] | None = None,
) -> Specialist:
    return Specialist(
        id=id,
        display_name=id,
        credentials="MD",
        npi=npi,
        subspecialties=subspecialties,
        licensed_states=states,
        organization=organization,
        academic=academic,
        max_open_reviews=limit,
        active=active,
        payer_networks=networks or [],
        out_of_office=[{"start": start, "end": end} for start, end in away or []],
    )


DIRECTORY = [
    specialist(
        "gyn-a",
        ["gynecologic_imaging", "body_imaging"],
        ["CA"],
        academic=True,
        npi="1111111111",
        organization="Pacific University",
    ),
    specialist("gyn-b", ["gynecologic_imaging"], ["CA", "NY"], networks=["ACME-PPO"]),
    specialist("body-a", ["body_imaging"], ["CA", "TX"], academic=True),
    specialist("mfm-a", ["maternal_fetal_medicine"], ["CA", "TX"], limit=2),
    specialist("mfm-b", ["maternal_fetal_medicine"], ["TX"], away=[("2025-03-05", "2025-03-06")]),
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
    plan_code: str | None = None,
    first_reader_npi: str | None = None,
    first_reader_organization: str | None = None,
) -> MatchSpecialist:
    return MatchSpecialist.model_validate(
        {
            "case_id": "case-1",
            "exam": {
                "exam_type": exam_type,
                "performed_on": "2025-03-01",
                "facility": "Mercy",
                "first_reader_npi": first_reader_npi,
                "first_reader_organization": first_reader_organization,
            },
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
            "plan_code": plan_code,
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
            "gyn-a",
            "gynecologic_imaging",
            id="academic centre before fewer open reviews",
        ),
        pytest.param(
            request("pelvic", "CA", plan_code="ACME-PPO"),
            {},
            "gyn-b",
            "gynecologic_imaging",
            id="in network before academic centre",
        ),
        pytest.param(
            request("pelvic", "CA", plan_code="OTHER"),
            {},
            "gyn-a",
            "gynecologic_imaging",
            id="nobody in network: academic centre decides",
        ),
        pytest.param(
            request("obstetric", "TX"),
            {"mfm-a": 1, "mfm-b": 0},
            "mfm-b",
            "maternal_fetal_medicine",
            id="same network and centre: lower load wins",
        ),
        pytest.param(
            request("pelvic", "CA", first_reader_npi="1111111111"),
            {},
            "gyn-b",
            "gynecologic_imaging",
            id="the first reader is not a candidate",
        ),
        pytest.param(
            request("pelvic", "CA", first_reader_organization="  pacific   UNIVERSITY "),
            {},
            "gyn-b",
            "gynecologic_imaging",
            id="nobody from the first reader's group",
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
            request("obstetric", "TX", exclude=("mfm-a", "mfm-b")),
            {},
            "maternal_fetal_medicine",
            "excluded for this case (mfm-a, mfm-b)",
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


NOW = datetime(2025, 3, 2, 9, 0, tzinfo=UTC)


def test_out_of_office_before_the_due_date_is_not_a_candidate() -> None:
    back_in_time = match_specialist(request("obstetric", "TX"), DIRECTORY, {"mfm-a": 1}, now=NOW)
    after_the_break = match_specialist(
        request("obstetric", "TX"), DIRECTORY, {"mfm-a": 1}, now=datetime(2025, 3, 7, tzinfo=UTC)
    )

    assert isinstance(back_in_time, Assignment) and back_in_time.specialist.id == "mfm-a"
    assert isinstance(after_the_break, Assignment) and after_the_break.specialist.id == "mfm-b"
    assert "available until the due date 2025-03-10" in after_the_break.explanation


def test_everyone_away_before_the_due_date_is_unmatched_with_the_reason() -> None:
    result = match_specialist(request("obstetric", "TX", exclude=("mfm-a",)), DIRECTORY, {}, now=NOW)

    assert isinstance(result, NoMatch)
    assert "out of office before the due date 2025-03-10 (mfm-b)" in result.reason


def test_only_conflicted_specialists_left_is_unmatched_with_the_reason() -> None:
    case = request("pelvic", "CA", first_reader_npi="1111111111", exclude=("gyn-b", "body-a"))

    result = match_specialist(case, DIRECTORY, {})

    assert isinstance(result, NoMatch)
    assert "conflict of interest (gyn-a is the first reader)" in result.reason


def test_explanation_names_network_conflict_and_availability() -> None:
    result = match_specialist(request("pelvic", "CA", plan_code="ACME-PPO"), DIRECTORY, {}, now=NOW)

    assert isinstance(result, Assignment)
    assert result.explanation == (
        "gyn-b: exam 'pelvic' -> gynecologic_imaging; licensed in CA; 0 of 5 open reviews; "
        "in network for ACME-PPO; no conflict of interest; available until the due date 2025-03-10; "
        "first of 3 candidates by subspecialty, network, academic centre, load"
    )


def test_a_reviewer_named_by_operations_is_taken_when_eligible() -> None:
    named = request("pelvic", "CA").model_copy(update={"preferred_reviewer": "body-a"})
    ineligible = request("pelvic", "CA").model_copy(update={"preferred_reviewer": "breast-a"})

    chosen = match_specialist(named, DIRECTORY, {})
    fallback = match_specialist(ineligible, DIRECTORY, {})

    assert isinstance(chosen, Assignment) and chosen.specialist.id == "body-a"
    assert chosen.subspecialty == "body_imaging"
    assert "named by operations when reassigning" in chosen.explanation
    assert isinstance(fallback, Assignment) and fallback.specialist.id == "gyn-a"
    assert "breast-a, named by operations, is not a candidate" in fallback.explanation
