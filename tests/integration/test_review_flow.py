"""Review on the real PostgreSQL: matching through the consumer, the worklist and findings API, the report."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pypdf import PdfReader
from sqlalchemy import delete, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts.commands import ComposeReport
from contracts.envelope import CloudEvent, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Inbox, Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import create_app
from services.review import api, consumer, deps, offers
from services.review.models import FollowUpQuestion, Report, Review, ReviewAddendum
from tests.keys import operations_headers, specialist_headers
from tests.unit.test_review_matching import request

ORIGINAL_REPORT = (
    "Right ovary: 5.8 cm complex cystic mass with a vascular solid component. Impression: O-RADS 5."
)
FINDINGS = {
    "technical_quality": "limited",
    "technical_notes": "No cine sweep through the lesion.",
    "agreement": "major_discrepancy",
    "findings": "Reticular internal echoes and a retracting clot without internal flow on colour Doppler.",
    "impression": "Haemorrhagic cyst, O-RADS 2; malignancy very unlikely.",
    "alternative_diagnoses": ["Endometrioma"],
    "recommendations": ["Repeat pelvic ultrasound in 8 to 12 weeks."],
    "new_ultrasound_needed": True,
    "radpeer_score": "3b",
    "patient_answers": "You do not need surgery now; a repeat scan will show whether the cyst goes away.",
}


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine("review", settings)
    migrate.upgrade("review", engine)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in (FollowUpQuestion, ReviewAddendum, Report, Review, Outbox, Inbox):
            conn.execute(delete(table))


@pytest.fixture
def client(engine: Engine, settings: Settings) -> Iterator[TestClient]:
    app = create_app("review", routers=[api.router], engine=lambda: engine)
    app.dependency_overrides[deps.review_engine] = lambda: engine
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as client:
        yield client


def match_command(
    exam_type: str = "pelvic", state: str = "CA", due_in_days: int = 7, **update: Any
) -> CloudEvent:
    case_id = f"case-{uuid.uuid4().hex[:8]}"
    base = request(exam_type, state)
    command = base.model_copy(
        update={
            "case_id": case_id,
            "due_at": datetime.now(UTC) + timedelta(days=due_in_days),
            "original_report": base.original_report.model_copy(update={"text": ORIGINAL_REPORT}),
            **update,
        }
    )
    return new_event(id=f"case-{case_id}:match-1", source="/workflows", data=command, subject=case_id)


def apply(engine: Engine, settings: Settings, event: CloudEvent) -> None:
    with Session(engine, expire_on_commit=False) as session:
        consumer.handle(session, event, settings)
        session.commit()


def outbox_event(engine: Engine, message_id: str) -> CloudEvent:
    with Session(engine) as session:
        row = session.exec(select(Outbox).where(Outbox.message_id == message_id)).one()
        assert row.exchange == "case.events"
        event = CloudEvent.model_validate_json(row.body)
    assert (event.type, event.source) == (row.routing_key, "/services/review")
    return event


def offered_review(engine: Engine, settings: Settings, **kwargs: Any) -> tuple[CloudEvent, dict[str, Any]]:
    command = match_command(**kwargs)
    apply(engine, settings, command)
    return command, outbox_event(engine, f"{command.id}>review.offered").data


def assigned_review(engine: Engine, settings: Settings, **kwargs: Any) -> tuple[CloudEvent, dict[str, Any]]:
    """A review offered and accepted by its specialist, as the worklist shows it before the findings."""
    command, offered = offered_review(engine, settings, **kwargs)
    with Session(engine) as session:
        review = session.get(Review, offered["review_id"])
        assert review is not None
        offers.accept(review, session)
        session.commit()
    return command, offered


def test_match_offers_the_case_to_a_specialist_and_announces_it(engine: Engine, settings: Settings) -> None:
    command = match_command("pelvic", "CA")

    apply(engine, settings, command)
    apply(engine, settings, command)  # a redelivered command changes nothing

    event = outbox_event(engine, f"{command.id}>review.offered")
    assert event.subject == command.subject
    assert event.data["reviewer_id"] == "spec-gyn-1"
    assert event.data["subspecialty"] == "gynecologic_imaging"
    assert event.data["explanation"].startswith(
        "spec-gyn-1: exam 'pelvic' -> gynecologic_imaging; licensed in CA; 0 of 5 open reviews"
    )
    with Session(engine) as session:
        reviews = session.exec(select(Review).where(Review.case_id == command.subject)).all()
    assert [(r.id, r.status, r.reviewer_id, r.match_explanation) for r in reviews] == [
        (event.data["review_id"], "offered", "spec-gyn-1", event.data["explanation"])
    ]


def test_no_specialist_licensed_in_the_state_is_announced_as_unmatched(
    engine: Engine, settings: Settings
) -> None:
    command = match_command("breast", "TX")

    apply(engine, settings, command)

    event = outbox_event(engine, f"{command.id}>review.unmatched")
    assert event.data["subspecialty"] == "breast_imaging"
    assert "licensed in TX" in event.data["reason"]
    with Session(engine) as session:
        assert session.exec(select(Review).where(Review.case_id == command.subject)).all() == []


def test_worklist_lists_the_reviewers_cases_soonest_due_first(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    later, _ = assigned_review(engine, settings, due_in_days=10)
    sooner, _ = assigned_review(engine, settings, due_in_days=2, clinical_question="Torsion?")
    assigned_review(engine, settings, exam_type="obstetric", state="TX")  # someone else's

    response = client.get("/v1/reviews", params={"reviewer": "spec-gyn-1"})

    assert response.status_code == 200
    items = response.json()
    assert [i["case_id"] for i in items] == [sooner.subject, later.subject]
    assert items[0]["clinical_question"] == "Torsion?"
    assert {(i["status"], i["exam_type"], i["urgency"]) for i in items} == {
        ("accepted", "pelvic", "standard")
    }


def test_worklist_needs_a_known_reviewer(client: TestClient) -> None:
    missing = client.get("/v1/reviews")
    unknown = client.get("/v1/reviews", params={"reviewer": "spec-nobody"})

    assert missing.status_code == 422
    assert [e["field"] for e in missing.json()["errors"]] == ["query.reviewer"]
    assert unknown.status_code == 404
    assert "spec-nobody" in unknown.json()["detail"]


def test_review_detail_gives_the_specialist_what_they_need(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, assigned = assigned_review(engine, settings, adequacy_warnings=["no cine clip of the lesion"])

    body = client.get(f"/v1/reviews/{assigned['review_id']}").json()

    assert body["original_report"]["text"] == ORIGINAL_REPORT
    assert body["study"]["study_instance_uid"] == "1.2.3"
    assert body["exam"]["exam_type"] == "pelvic"
    assert (body["clinical_question"], body["reason"]) == ("Is the mass malignant?", "possible_malignancy")
    assert body["records_url"] == f"{settings.records_url}/v1/records/{command.subject}"
    assert body["dicomweb_study_url"] == f"{settings.records_url}/dicomweb/studies/1.2.3"
    assert body["adequacy_warnings"] == ["no cine clip of the lesion"]
    assert body["match_explanation"].startswith("spec-gyn-1: exam 'pelvic'")
    assert body["findings"] is None
    assert client.get("/v1/reviews/no-such-review").status_code == 404


def test_submission_records_the_second_opinion_and_announces_it(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, assigned = assigned_review(engine, settings)
    review_id = assigned["review_id"]

    by_the_desk = client.post(f"/v1/reviews/{review_id}", json=FINDINGS)
    response = client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings))

    # The report says "electronically signed by" the specialist: the operations desk cannot sign for them.
    assert by_the_desk.status_code == 403 and "only the reviewing specialist" in by_the_desk.json()["detail"]
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "submitted"
    assert response.json()["findings"] == FINDINGS | {
        "assessments": [],
        "critical_result": False,
        "communication": None,
    }
    event = outbox_event(engine, f"review.submitted:{review_id}")
    assert event.subject == command.subject
    assert event.data == {
        "case_id": command.subject,
        "review_id": review_id,
        "reviewer_id": "spec-gyn-1",
        "agreement": "major_discrepancy",
        "critical": False,
        "communicated": False,  # the case waits for operations to document who was told
    }
    worklist = client.get("/v1/reviews", params={"reviewer": "spec-gyn-1", "status": "submitted"}).json()
    assert [i["review_id"] for i in worklist] == [review_id]


def test_a_second_submission_is_refused(engine: Engine, settings: Settings, client: TestClient) -> None:
    _, assigned = assigned_review(engine, settings)
    review_id = assigned["review_id"]
    signed = specialist_headers(settings)
    client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=signed)

    again = client.post(
        f"/v1/reviews/{review_id}", json={**FINDINGS, "impression": "Changed my mind."}, headers=signed
    )

    assert again.status_code == 409
    assert f"review {review_id} was already submitted at" in again.json()["detail"]
    assert "corrections are addenda" in again.json()["detail"]
    assert client.get(f"/v1/reviews/{review_id}").json()["findings"]["impression"] == FINDINGS["impression"]


def test_submission_for_an_unknown_review_is_404(client: TestClient) -> None:
    assert client.post("/v1/reviews/no-such-review", json=FINDINGS).status_code == 404


def test_an_incomplete_submission_names_what_is_missing(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    _, assigned = assigned_review(engine, settings)
    body = {k: v for k, v in FINDINGS.items() if k != "impression"}
    body |= {"findings": "  ", "recommendations": [], "agreement": "sort of", "surprise": 1}

    response = client.post(f"/v1/reviews/{assigned['review_id']}", json=body)

    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"agreement", "findings", "impression", "recommendations", "surprise"}
    assert client.get(f"/v1/reviews/{assigned['review_id']}").json()["status"] == "accepted"


def submitted_review(engine: Engine, settings: Settings, client: TestClient) -> tuple[str, str]:
    command, assigned = assigned_review(engine, settings)
    signed = specialist_headers(settings)
    assert (
        client.post(f"/v1/reviews/{assigned['review_id']}", json=FINDINGS, headers=signed).status_code == 200
    )
    return command.subject, assigned["review_id"]


def compose_command(
    case_id: str, review_id: str, attempt: int = 1, *, own_addenda: bool = True
) -> CloudEvent:
    """The workflow's report.compose (`own_addenda=False`: as a case from before own addenda sends it)."""
    command = ComposeReport(case_id=case_id, review_id=review_id, own_addenda_delivered=own_addenda)
    return new_event(
        id=f"case-{case_id}:compose-{attempt}", source="/workflows", data=command, subject=case_id
    )


def pdf_text(pdf: bytes) -> str:
    return " ".join(" ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages).split())


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_a_communication_time_utc_cannot_hold_is_refused_at_submission_not_when_the_report_is_composed(
    engine: Engine, settings: Settings, client: TestClient, at: str
) -> None:
    """The report prints who was told in UTC: a time whose UTC is in year 0 or 10000 was taken, and every
    composition of the report failed on it (OverflowError), leaving the case without its report."""
    _, assigned = assigned_review(engine, settings)
    told = {"recipient": "Dr Ref (referring)", "method": "telephone", "at": at}
    body = FINDINGS | {"critical_result": True, "communication": told}

    response = client.post(
        f"/v1/reviews/{assigned['review_id']}", json=body, headers=specialist_headers(settings)
    )

    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "field": "communication.at",
            "message": "Value error, is outside the years 1 to 9999 once converted to UTC; send a time within them",
        }
    ]
    draft = client.put(
        f"/v1/reviews/{assigned['review_id']}/draft",
        json={"communication": told},
        headers=specialist_headers(settings),
    )
    assert draft.status_code == 422
    assert client.get(f"/v1/reviews/{assigned['review_id']}").json()["status"] == "accepted"


def test_compose_stores_the_pdf_and_announces_the_report(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)

    apply(engine, settings, compose_command(case_id, review_id))

    with Session(engine) as session:
        report = session.exec(select(Report).where(Report.case_id == case_id)).one()
    pdf = (settings.data_dir / "review" / "reports" / f"{report.pdf_sha256}.pdf").read_bytes()
    assert hashlib.sha256(pdf).hexdigest() == report.pdf_sha256
    text = pdf_text(pdf)
    for expected in (ORIGINAL_REPORT, FINDINGS["impression"], "Elena Marquez, MD, FACR", "Major discrepancy"):
        assert expected in text
    ready = outbox_event(engine, f"report.ready:{case_id}")
    assert ready.data == {
        "case_id": case_id,
        "report_id": report.id,
        "pdf_url": f"{settings.review_url}/v1/reports/{case_id}/pdf",
        "fhir_url": f"{settings.review_url}/fhir/DiagnosticReport/{report.id}",
        "sha256": report.pdf_sha256,
    }


def test_compose_twice_keeps_the_first_report(engine: Engine, settings: Settings, client: TestClient) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id, attempt=1))

    apply(engine, settings, compose_command(case_id, review_id, attempt=2))

    with Session(engine) as session:
        assert len(session.exec(select(Report).where(Report.case_id == case_id)).all()) == 1
        ready = session.exec(select(Outbox).where(Outbox.routing_key == "report.ready")).all()
    assert [r.message_id for r in ready] == [f"report.ready:{case_id}"]


def test_compose_before_submission_is_refused(engine: Engine, settings: Settings) -> None:
    command, assigned = assigned_review(engine, settings)

    with pytest.raises(PoisonMessage, match="not submitted"):
        apply(engine, settings, compose_command(command.subject, assigned["review_id"]))


def test_report_is_served_as_fhir_or_pdf_by_accept_header(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))

    as_fhir = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/fhir+json"})
    as_json = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/json"})
    as_pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"})

    assert as_fhir.headers["content-type"].startswith("application/fhir+json")
    assert as_json.json() == as_fhir.json()
    assert as_pdf.headers["content-type"] == "application/pdf"
    resource = DiagnosticReport.model_validate(as_fhir.json())
    assert resource.status == "final"
    assert resource.conclusion is not None
    assert resource.conclusion.startswith(f"{FINDINGS['impression']}\n\nRecommendations:\n- Repeat pelvic")
    assert resource.subject.display == "Jane Doe"
    form = as_fhir.json()["presentedForm"][0]
    assert form["url"] == f"{settings.review_url}/v1/reports/{case_id}/pdf"
    fetched = client.get(form["url"].removeprefix(settings.review_url), headers={"Accept": "*/*"})
    assert fetched.headers["content-type"] == "application/pdf"
    assert (
        base64.b64encode(hashlib.sha1(fetched.content, usedforsecurity=False).digest()).decode()
        == form["hash"]
    )
    assert form["size"] == len(as_pdf.content)
    assert base64.b64decode(form["hash"]) == hashlib.sha1(as_pdf.content, usedforsecurity=False).digest()
    assert ORIGINAL_REPORT in pdf_text(as_pdf.content)

    by_id = client.get(f"/fhir/DiagnosticReport/{resource.id}")
    assert by_id.headers["content-type"].startswith("application/fhir+json")
    assert by_id.json() == as_fhir.json()


def test_missing_reports_are_404_and_unsupported_formats_406(client: TestClient) -> None:
    assert client.get("/v1/reports/case-unknown").status_code == 404
    assert client.get("/v1/reports/case-unknown", headers={"Accept": "text/html"}).status_code == 406
    missing = client.get("/fhir/DiagnosticReport/no-such-report")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/fhir+json")
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert missing.json()["issue"][0]["code"] == "not-found"
    for ask in ({"Accept": "application/fhir+xml"}, {"_format": "xml"}):
        xml = client.get("/fhir/DiagnosticReport/no-such-report", **(
            {"headers": ask} if "Accept" in ask else {"params": ask}
        ))  # fmt: skip
        assert xml.status_code == 406, ask
        assert xml.json()["issue"][0]["code"] == "not-supported"


def test_directory_is_seeded_across_subspecialties_and_states(client: TestClient) -> None:
    directory = client.get("/v1/specialists").json()

    subspecialties = {s for d in directory for s in d["subspecialties"]}
    states = {s for d in directory for s in d["licensed_states"]}
    assert len(directory) >= 8
    assert {"gynecologic_imaging", "maternal_fetal_medicine", "breast_imaging", "vascular"} <= subspecialties
    assert {"CA", "NY", "TX", "MA", "WA"} <= states


def test_migrations_also_run_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine("review", Settings(data_dir=tmp_path, database_url=None))
    migrate.upgrade("review", engine)
    migrate.upgrade("review", engine)  # a second start is a no-op

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM specialists")).scalar_one() >= 8
    engine.dispose()


def test_a_match_that_does_not_commit_lets_no_specialist_see_the_case(
    engine: Engine, settings: Settings
) -> None:
    # Applied again after a rollback the match may offer someone else: the first pick must not keep access
    # to the case's records (the auth registry is written only once the offer's transaction committed).
    from services.auth.models import CaseReviewer

    auth = make_engine("auth", settings)
    migrate.upgrade("auth", auth)
    command = match_command()

    def reviewers() -> list[str]:
        with Session(auth) as session:
            rows = session.exec(select(CaseReviewer).where(CaseReviewer.case_id == command.subject)).all()
            return [r.specialist_id for r in rows]

    with Session(engine) as session:
        consumer.handle(session, command, settings)
        session.rollback()  # a later message of its batch failed, or the process died before the commit
    assert reviewers() == []
    apply(engine, settings, command)
    offered = outbox_event(engine, f"{command.id}>review.offered").data
    assert reviewers() == [offered["reviewer_id"]]


def test_accepting_the_offer_registers_the_specialist_again(engine: Engine, settings: Settings) -> None:
    # The process died between the offer's commit and its registration: the acceptance repairs it.
    from services.auth.models import CaseReviewer

    auth = make_engine("auth", settings)
    migrate.upgrade("auth", auth)
    command, offered = offered_review(engine, settings)
    with auth.begin() as conn:
        conn.execute(delete(CaseReviewer).where(CaseReviewer.case_id == command.subject))
    with Session(engine) as session:
        review = session.get(Review, offered["review_id"])
        assert review is not None
        offers.accept(review, session)
        session.commit()
    with Session(auth) as session:
        assert session.get(CaseReviewer, (command.subject, offered["reviewer_id"])) is not None
