"""What the specialist signs stays signed: the signature block copied at submission, addenda of their own,
recommendations with a follow-up interval. On the real PostgreSQL through the review API."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pydicom
import pytest
from alembic import command
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.commands import CloseReview
from contracts.envelope import new_event
from contracts.events import CaseCancelled
from services.common import migrate
from services.common.config import Settings
from services.common.db import Outbox
from services.review.diagnostic_report import attachment_hash
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


def test_the_specialist_adds_an_addendum_of_their_own_as_a_new_report_version(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    path, signed = f"/v1/reviews/{review_id}/addenda", specialist_headers(settings)
    correction = {"kind": "correction", "text": "The lesion is in the LEFT ovary, not the right."}

    too_early = client.post(path, json=correction, headers=signed)
    apply(engine, settings, compose_command(case_id, review_id))
    first_pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    by_the_desk = client.post(path, json=correction)
    by_another_specialist = client.post(
        path, json=correction, headers=specialist_headers(settings, "spec-ob-1")
    )
    empty = client.post(path, json={"kind": "correction", "text": "  "}, headers=signed)
    unknown_kind = client.post(path, json={"kind": "retraction", "text": "x"}, headers=signed)
    added = client.post(path, json=correction, headers=signed)

    assert too_early.status_code == 409 and too_early.headers["content-type"] == "application/problem+json"
    assert "has no report yet" in too_early.json()["detail"]
    assert by_the_desk.status_code == 403 and "only the reviewing specialist" in by_the_desk.json()["detail"]
    assert by_another_specialist.status_code == 404
    assert empty.status_code == 422 and unknown_kind.status_code == 422
    assert correction["text"] not in str(empty.json())  # no clinical text echoed in errors
    assert added.status_code == 201, added.text
    body = added.json()
    assert (body["kind"], body["text"], body["report_version"]) == ("correction", correction["text"], 2)
    fhir = client.get(f"/v1/reports/{case_id}").json()
    report = DiagnosticReport.model_validate(fhir)
    assert (report.status, report.meta.versionId) == ("corrected", "2")  # R4: a correction of what it said
    assert "extension" not in fhir
    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    assert pdf != first_pdf and fhir["presentedForm"][0]["hash"] == attachment_hash(pdf)
    text = pdf_text(pdf)
    assert (
        "Addendum 1 — by the reviewing specialist" in text and "Correction (added by the specialist" in text
    )
    assert "LEFT ovary" in text and "Question:" not in text
    assert flow.FINDINGS["impression"] in text  # the signed review stands
    addended = flow.outbox_event(engine, f"report.addended:{case_id}:{body['addendum_id']}")
    assert addended.data == {
        "case_id": case_id,
        "review_id": review_id,
        "report_id": report.id,
        "addendum_id": body["addendum_id"],
        "version": 2,
    }
    archived = flow.outbox_event(engine, f"document.encapsulated_report:{case_id}:2")
    assert archived.data["version"] == 2
    dicom = pydicom.dcmread(io.BytesIO(base64.b64decode(archived.data["dicom_base64"])))
    assert (dicom.InstanceNumber, dicom.DocumentTitle.endswith("(addendum 1)")) == (2, True)
    detail = client.get(f"/v1/reviews/{review_id}").json()
    assert [a["addendum_id"] for a in detail["addenda"]] == [body["addendum_id"]]
    summary = client.get(f"/v1/reports/{case_id}/patient-summary").json()
    assert summary["specialist_addenda"] == [{"kind": "Correction", "text": correction["text"]}]


def test_addenda_and_answers_are_numbered_in_the_order_they_were_signed(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    signed = specialist_headers(settings)
    apply(engine, settings, question_command(case_id, "q1", "Is an MRI needed?"))
    client.post(f"/v1/reviews/{review_id}/questions/q1/answer", json={"answer": "No MRI."}, headers=signed)
    late = {"kind": "late_comparison", "text": "Prior scan of 2024 received: the cyst is new."}

    added = client.post(f"/v1/reviews/{review_id}/addenda", json=late, headers=signed)

    assert added.status_code == 201 and added.json()["report_version"] == 3
    shown = client.get(f"/v1/reports/{case_id}").json()
    assert (shown["meta"]["versionId"], shown["status"]) == ("3", "appended")  # added to, nothing corrected
    text = pdf_text(client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content)
    assert text.index("Addendum 1 — answer to a follow-up question") < text.index("No MRI.")
    assert text.index("Addendum 2 — by the reviewing specialist") < text.index("the cyst is new")
    assert "Comparison with prior imaging received after signing" in text


def test_an_addendum_sent_twice_is_signed_once(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    # A double click, or a retry after an answer lost on the way: the report must not carry the addendum twice
    # nor go out to the referring physician twice.
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    path, signed = f"/v1/reviews/{review_id}/addenda", specialist_headers(settings)
    finding = {"kind": "additional_finding", "text": "Small amount of free fluid in the pouch of Douglas."}

    first = client.post(path, json=finding, headers=signed)
    again = client.post(path, json=finding, headers=signed)  # no key: identical to the latest addendum
    keyed = {**signed, "Idempotency-Key": "add-7f3a"}
    other = {"kind": "correction", "text": "The cyst measures 4.6 cm, not 4.2 cm."}
    second = client.post(path, json=other, headers=keyed)
    retried = client.post(path, json=other, headers=keyed)
    reused_key = client.post(path, json={"kind": "other", "text": "Something else."}, headers=keyed)

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert (second.status_code, retried.status_code) == (201, 200)
    assert retried.json() == second.json() and retried.headers["Idempotent-Replayed"] == "true"
    assert reused_key.status_code == 422 and "use a new key" in reused_key.json()["detail"]
    assert "Something else" not in reused_key.text
    assert [a["report_version"] for a in client.get(f"/v1/reviews/{review_id}").json()["addenda"]] == [2, 3]
    assert client.get(f"/v1/reports/{case_id}").json()["meta"]["versionId"] == "3"
    for addendum in (first.json(), second.json()):  # one report.addended each, so one delivery each
        flow.outbox_event(engine, f"report.addended:{case_id}:{addendum['addendum_id']}")
    with Session(engine) as session:
        sent = session.exec(
            select(Outbox).where(col(Outbox.message_id).startswith(f"report.addended:{case_id}:"))
        )
        assert len(sent.all()) == 2


def test_a_case_from_before_own_addenda_refuses_one_rather_than_lose_it(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    # Its workflow (older code) ignores report.addended: accepted, the addendum would never be delivered.
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id, own_addenda=False))

    refused = client.post(
        f"/v1/reviews/{review_id}/addenda",
        json={"kind": "correction", "text": "Left, not right."},
        headers=specialist_headers(settings),
    )

    assert refused.status_code == 409, refused.text
    assert "would not reach the referring physician" in refused.json()["detail"]
    assert "Left, not right" not in refused.text
    assert client.get(f"/v1/reports/{case_id}").json()["meta"]["versionId"] == "1"


def test_a_cancelled_case_takes_no_addendum(engine: Engine, settings: Settings, client: TestClient) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))  # composed while the cancel was on its way
    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="ops")
    apply(
        engine,
        settings,
        new_event(id=f"{case_id}:cancel", source="/workflows", data=cancelled, subject=case_id),
    )

    refused = client.post(
        f"/v1/reviews/{review_id}/addenda",
        json={"kind": "additional_finding", "text": "Small amount of free fluid."},
        headers=specialist_headers(settings),
    )

    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert f"case {case_id} was cancelled at" in refused.json()["detail"]
    assert "free fluid" not in refused.text
    assert client.get(f"/v1/reports/{case_id}").json()["meta"]["versionId"] == "1"


def test_a_closed_case_takes_no_addendum(engine: Engine, settings: Settings, client: TestClient) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    closed = CloseReview(case_id=case_id, reason="follow-up window ended")
    apply(
        engine, settings, new_event(id=f"{case_id}:close", source="/workflows", data=closed, subject=case_id)
    )

    refused = client.post(
        f"/v1/reviews/{review_id}/addenda",
        json={"kind": "correction", "text": "Left, not right."},
        headers=specialist_headers(settings),
    )

    assert refused.status_code == 409
    assert f"case {case_id} closed at" in refused.json()["detail"]
    assert "Tell the referring physician directly" in refused.json()["detail"]


@pytest.mark.parametrize("delivered", [0, 1])
def test_an_addendum_signed_as_the_case_closed_is_not_lost_silently(
    engine: Engine, settings: Settings, client: TestClient, delivered: int
) -> None:
    # The workflow delivered `delivered` own addenda, then closed; the specialist signed one just before the
    # close reached the review service. Undelivered, it must reach operations (intake shows case.alert).
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    signed = specialist_headers(settings)
    added = client.post(
        f"/v1/reviews/{review_id}/addenda",
        json={"kind": "correction", "text": "The right ovary, not the left."},
        headers=signed,
    ).json()
    closed = CloseReview(case_id=case_id, reason="follow-up window ended", own_addenda_delivered=delivered)
    apply(
        engine, settings, new_event(id=f"{case_id}:close", source="/workflows", data=closed, subject=case_id)
    )

    with Session(engine) as session:
        alerts = session.exec(
            select(Outbox).where(col(Outbox.message_id).startswith(f"case.alert:{case_id}:undelivered:"))
        ).all()
    if delivered:
        assert alerts == []
    else:
        [alert] = alerts
        assert alert.message_id.endswith(added["addendum_id"])
        data = flow.outbox_event(engine, alert.message_id).data
        assert data["kind"] == "addendum_not_delivered" and "report version 2" in data["detail"]
        assert "ovary" not in data["detail"]  # no clinical text in an alert


def test_the_migrations_for_signature_and_addenda_go_down_and_up_again(engine: Engine) -> None:
    config = migrate.alembic_config("review", engine)

    command.downgrade(config, "0004")
    down = inspect(engine)
    columns_down = {c["name"] for c in down.get_columns("reviews")}
    tables_down = set(down.get_table_names())
    command.upgrade(config, "head")
    up = inspect(engine)

    assert not {"signed_name", "signed_credentials", "signed_npi", "case_cancelled_at"} & columns_down
    assert "addenda" not in tables_down
    assert {"signed_name", "signed_npi", "case_cancelled_at"} <= {
        c["name"] for c in up.get_columns("reviews")
    }
    assert "addenda" in up.get_table_names()
