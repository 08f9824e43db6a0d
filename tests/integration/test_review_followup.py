"""After the review: the report as DICOM, the patient's summary, follow-up questions as addenda, QA stats."""

from __future__ import annotations

import base64
import io

import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy.engine import Engine

from contracts.commands import FollowUpQuestionForReviewer
from contracts.envelope import CloudEvent, new_event
from services.common.config import Settings
from services.common.errors import PoisonMessage
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import (
    FINDINGS,
    ORIGINAL_REPORT,
    apply,
    compose_command,
    outbox_event,
    pdf_text,
    submitted_review,
)
from tests.keys import specialist_headers

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


def question_command(case_id: str, question_id: str, text: str) -> CloudEvent:
    command = FollowUpQuestionForReviewer(
        case_id=case_id, question_id=question_id, text=text, asked_by="ref-1"
    )
    return new_event(
        id=f"case-{case_id}:question-{question_id}", source="/workflows", data=command, subject=case_id
    )


@pytest.fixture
def delivered(engine: Engine, settings: Settings, client: TestClient) -> tuple[str, str]:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    return case_id, review_id


def test_report_as_dicom_encapsulated_pdf_in_the_original_study(
    engine: Engine, delivered: tuple[str, str], client: TestClient
) -> None:
    # What the review service issues to records; its download serves records' copy placed in the study
    # (test_report_dicom_download).
    case_id, _ = delivered

    issued = outbox_event(engine, f"document.encapsulated_report:{case_id}:1")

    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(issued.data["dicom_base64"])))
    assert ds.SOPInstanceUID == issued.data["sop_instance_uid"]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert (ds.StudyInstanceUID, ds.Modality, ds.MIMETypeOfEncapsulatedDocument) == (
        "1.2.3",
        "DOC",
        "application/pdf",
    )
    assert str(ds.PatientName) == "Doe^Jane"
    pdf = bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]
    assert pdf == client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    assert ORIGINAL_REPORT in pdf_text(pdf)


def test_patient_summary_is_plain_and_never_shows_the_radpeer_score(
    delivered: tuple[str, str], client: TestClient
) -> None:
    case_id, _ = delivered

    response = client.get(f"/v1/reports/{case_id}/patient-summary")

    assert response.status_code == 200
    summary = response.json()
    assert summary["agreement"].startswith("The specialist reached a different conclusion")
    assert summary["conclusion"] == FINDINGS["impression"]
    assert summary["answers_to_your_questions"] == FINDINGS["patient_answers"]
    assert "You will need a new ultrasound examination." in summary["next_steps"]
    assert "radpeer" not in response.text.lower()
    assert '"3b"' not in response.text
    assert client.get("/v1/reports/case-none/patient-summary").status_code == 404


def test_a_follow_up_answer_is_an_addendum_to_a_new_report_version(
    engine: Engine, settings: Settings, delivered: tuple[str, str], client: TestClient
) -> None:
    case_id, review_id = delivered
    first_pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    question = "Can the repeat scan be done at our clinic?"
    apply(engine, settings, question_command(case_id, "q1", question))
    apply(engine, settings, question_command(case_id, "q1", question))  # redelivered: one question

    worklist = client.get("/v1/reviews", params={"reviewer": "spec-gyn-1"}).json()
    answer_path = f"/v1/reviews/{review_id}/questions/q1/answer"
    signed = specialist_headers(settings)
    by_the_desk = client.post(answer_path, json={"answer": "Yes."})
    empty = client.post(answer_path, json={"answer": " "}, headers=signed)
    answered = client.post(
        answer_path, json={"answer": "Yes, with a transvaginal probe and cine sweeps."}, headers=signed
    )
    twice = client.post(answer_path, json={"answer": "Changed."}, headers=signed)
    unknown = client.post(
        f"/v1/reviews/{review_id}/questions/q9/answer", json={"answer": "Yes."}, headers=signed
    )

    assert [(i["review_id"], i["open_questions"]) for i in worklist] == [(review_id, 1)]
    assert by_the_desk.status_code == 403  # the addendum is signed by the specialist, not the desk
    assert empty.status_code == 422
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "answered"
    assert twice.status_code == 409
    assert unknown.status_code == 404
    fhir = client.get(f"/v1/reports/{case_id}").json()
    report = DiagnosticReport.model_validate(fhir)
    assert report.status == "appended"
    assert "contained" not in fhir and "extension" not in fhir
    assert fhir["meta"]["versionId"] == "2"
    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    assert pdf != first_pdf
    text = pdf_text(pdf)
    assert "Addendum 1" in text and question in text and "cine sweeps" in text
    assert FINDINGS["impression"] in text  # the signed review stands
    assert outbox_event(engine, f"review.answered:{case_id}:q1").data == {
        "case_id": case_id,
        "question_id": "q1",
        "review_id": review_id,
        "report_id": report.id,
    }
    summary = client.get(f"/v1/reports/{case_id}/patient-summary").json()
    assert summary["follow_up_answers"][0]["question"] == question


def test_at_most_three_follow_up_questions(
    engine: Engine, settings: Settings, delivered: tuple[str, str]
) -> None:
    case_id, _ = delivered
    for n in (1, 2, 3):
        apply(engine, settings, question_command(case_id, f"q{n}", f"Question number {n}?"))

    with pytest.raises(PoisonMessage, match="at most 3"):
        apply(engine, settings, question_command(case_id, "q4", "One more?"))


def test_a_question_before_any_submitted_review_is_refused(engine: Engine, settings: Settings) -> None:
    with pytest.raises(PoisonMessage, match="no submitted review"):
        apply(engine, settings, question_command("case-unreviewed", "q1", "Anything?"))


def test_stats_give_concordance_and_turnaround_per_subspecialty_and_reviewer(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    submitted_review(engine, settings, client)
    submitted_review(engine, settings, client)

    stats = client.get("/v1/reviews/stats").json()

    by_reviewer = {row["key"]: row for row in stats["by_reviewer"]}
    by_subspecialty = {row["key"]: row for row in stats["by_subspecialty"]}
    gyn = by_reviewer["spec-gyn-1"]
    assert (gyn["submitted"], gyn["major_discrepancy"], gyn["concordance_rate"]) == (2, 2, 0.0)
    assert 0 <= gyn["median_turnaround_hours"] < 1
    assert by_subspecialty["gynecologic_imaging"]["submitted"] == 2
    assert "3b" not in str(stats)
