"""What the specialist signs stays signed: the signature block copied at submission, addenda of their own,
recommendations with a follow-up interval. On the real PostgreSQL through the review API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.common.config import Settings
from services.review.models import Review, Specialist
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import apply, compose_command, pdf_text, submitted_review
from tests.integration.test_review_followup import question_command
from tests.keys import specialist_headers

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


@pytest.fixture
def renamed_in_the_directory(engine: Engine) -> Iterator[None]:
    """spec-gyn-1's directory entry changes after signing (a new name, credentials, NPI); restored after."""
    with Session(engine) as session:
        entry = session.get(Specialist, "spec-gyn-1")
        assert entry is not None
        before = (entry.display_name, entry.credentials, entry.npi)
    yield
    with Session(engine) as session:
        entry = session.get(Specialist, "spec-gyn-1")
        assert entry is not None
        entry.display_name, entry.credentials, entry.npi = before
        session.add(entry)
        session.commit()


def rename(engine: Engine) -> tuple[str, str, str]:
    with Session(engine) as session:
        entry = session.get(Specialist, "spec-gyn-1")
        assert entry is not None
        signed_as = (entry.display_name, entry.credentials, entry.npi)
        entry.display_name, entry.credentials, entry.npi = "Renamed Later", "MD, PhD", "1999999999"
        session.add(entry)
        session.commit()
    return signed_as


def test_the_report_prints_the_signature_as_it_was_at_signing(
    engine: Engine, settings: Settings, client: TestClient, renamed_in_the_directory: None
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    name, credentials, npi = rename(engine)
    apply(engine, settings, compose_command(case_id, review_id))
    apply(engine, settings, question_command(case_id, "q1", "Is an MRI needed?"))
    answered = client.post(
        f"/v1/reviews/{review_id}/questions/q1/answer",
        json={"answer": "No."},
        headers=specialist_headers(settings),
    )

    assert answered.status_code == 200, answered.text
    text = pdf_text(client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content)
    assert f"{name}, {credentials}" in text and f"NPI {npi}" in text
    assert "Renamed Later" not in text and "1999999999" not in text
    report = DiagnosticReport.model_validate(client.get(f"/v1/reports/{case_id}").json())
    [interpreter] = report.resultsInterpreter
    assert interpreter.display == f"{name}, {credentials}" and interpreter.identifier.value == npi
    summary = client.get(f"/v1/reports/{case_id}/patient-summary").json()
    assert summary["reviewer"] == f"{name}, {credentials}"


def test_a_review_signed_before_the_copy_was_kept_prints_the_directory_entry(
    engine: Engine, settings: Settings, client: TestClient, renamed_in_the_directory: None
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    with Session(engine) as session:
        review = session.get(Review, review_id)
        assert review is not None and review.signed_name is not None
        review.signed_name = review.signed_credentials = review.signed_npi = None  # as migrated rows are
        session.add(review)
        session.commit()
    rename(engine)

    apply(engine, settings, compose_command(case_id, review_id))

    text = pdf_text(client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content)
    assert "Renamed Later, MD, PhD" in text and "NPI 1999999999" in text


STRUCTURED = {
    "text": "Follow-up pelvic ultrasound",
    "follow_up": {"action": "ultrasound", "when": {"value": 6, "up_to": 12, "unit": "weeks"}},
}


def test_recommendations_with_a_follow_up_interval_are_signed_and_reported(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    _, assigned = flow.assigned_review(engine, settings)
    review_id, signed = assigned["review_id"], specialist_headers(settings)
    recommendations = [STRUCTURED, "No surgery on the strength of the first scan."]
    bad_interval = {"follow_up": {"action": "mri", "when": {"value": 0, "unit": "weeks"}}}

    draft = client.put(
        f"/v1/reviews/{review_id}/draft", json={"recommendations": [STRUCTURED]}, headers=signed
    )
    refused = client.post(
        f"/v1/reviews/{review_id}",
        json=flow.FINDINGS | {"recommendations": ["Fine.", bad_interval]},
        headers=signed,
    )
    submitted = client.post(
        f"/v1/reviews/{review_id}", json=flow.FINDINGS | {"recommendations": recommendations}, headers=signed
    )

    assert draft.status_code == 200 and draft.json()["draft"]["recommendations"][0]["follow_up"]["when"] == {
        "unit": "weeks",
        "value": 6,
        "up_to": 12,
    }
    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert error["field"].startswith("recommendations.1.structured.follow_up.when")
    assert "positive value" in error["message"]
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["findings"]["recommendations"] == [
        STRUCTURED
        | {"follow_up": STRUCTURED["follow_up"] | {"when": {"unit": "weeks", "value": 6, "up_to": 12}}},
        "No surgery on the strength of the first scan.",
    ]
    case_id = submitted.json()["case_id"]
    apply(engine, settings, compose_command(case_id, review_id))
    text = pdf_text(client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content)
    assert "Follow-up pelvic ultrasound (ultrasound in 6–12 weeks)." in text
    conclusion = client.get(f"/v1/reports/{case_id}").json()["conclusion"]
    assert "- Follow-up pelvic ultrasound (ultrasound in 6–12 weeks).\n- No surgery" in conclusion
    summary = client.get(f"/v1/reports/{case_id}/patient-summary").json()
    assert summary["next_steps"][0] == "Follow-up pelvic ultrasound (ultrasound in 6–12 weeks)."
