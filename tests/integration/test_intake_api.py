"""Intake's case API and consumer on the real PostgreSQL (no Temporal: the reconciler starts workflows).

Every request carries a partner's API key; `client` sends partner A's.
"""

from __future__ import annotations

import base64
import copy
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import CaseStatusChanged, CloudEvent, DeliverReport, new_event
from contracts.events import CaseCancelled
from contracts.models import CaseStatus
from services.auth import auth_engine
from services.auth.models import AuditEvent
from services.auth.partners import create_partner
from services.common import migrate
from services.common.config import Settings
from services.common.db import Inbox, Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import MAX_JSON_BODY_BYTES, create_app
from services.intake import api, consumer, handlers
from services.intake.models import Case, CaseDocument, CaseTimelineEntry

SAMPLE = {
    "patient": {
        "family_name": "Doe",
        "given_name": "Jane",
        "birth_date": "1984-03-02",
        "sex": "female",
        "mrn": "MRN-0042",
        "state": "CA",
    },
    "referring": {"name": "Dr. Alex Kim", "npi": "1234567893", "organization": "Bayview Women's Clinic"},
    "exam": {"exam_type": "pelvic", "performed_on": "2026-11-20", "facility": "Bayview Imaging"},
    "clinical_question": "Complex adnexal mass: benign or suspicious?",
    "reason": "possible_malignancy",
    "coverage": {"plan_code": "ACME-PPO", "member_id": "W123456789"},
}


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("intake", settings)
    migrate.upgrade("intake", engine)
    return engine


@pytest.fixture(scope="module")
def auth(settings: Settings) -> Engine:
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    return engine


def new_partner(auth: Engine, name: str) -> dict[str, str]:
    with Session(auth) as session:
        credentials = create_partner(session, name)
        session.commit()
    return {"partner_id": credentials.partner_id, "Authorization": f"Bearer {credentials.api_key}"}


@pytest.fixture(scope="module")
def partner(auth: Engine) -> dict[str, str]:
    return new_partner(auth, "Clinic A")


@pytest.fixture(scope="module")
def client(engine: Engine, auth: Engine, partner: dict[str, str]) -> Iterator[TestClient]:
    app = create_app("intake", routers=[api.router], engine=lambda: engine)
    app.dependency_overrides[api.intake_engine] = lambda: engine
    app.dependency_overrides[auth_engine] = lambda: auth
    app.dependency_overrides[api.temporal_client] = lambda: None  # Temporal down: the case must still be kept
    with TestClient(app, headers={"Authorization": partner["Authorization"]}) as c:
        yield c


def test_create_case_stores_it_with_triage_and_no_phi_in_the_answer(
    client: TestClient, engine: Engine, partner: dict[str, str]
) -> None:
    response = client.post("/v1/cases", json=SAMPLE)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["partner_id"] == partner["partner_id"]  # the key decides the partner
    assert body["status"] == "intake"
    assert body["urgency"] == "priority"
    assert body["subspecialty"] == "gynecologic_imaging"
    assert body["workflow_id"] == f"case-{body['case_id']}"
    assert "Jane" not in response.text and "MRN-0042" not in response.text
    with Session(engine) as session:
        case = session.get(Case, body["case_id"])
        assert case is not None and case.workflow_started is False  # the reconciler will start it
    # Left to its own POST for a while (under load a start takes a second or more), then the reconciler's.
    assert body["case_id"] not in {c.id for c in api.unstarted_cases(engine)}
    assert body["case_id"] in {c.id for c in api.unstarted_cases(engine, settled_for=timedelta(0))}
    assert client.get(f"/v1/cases/{body['case_id']}").json()["timeline"][0]["status"] == "intake"


def test_same_partner_reference_never_creates_a_second_case(client: TestClient) -> None:
    body = dict(SAMPLE, partner_case_ref=f"REF-{uuid.uuid4().hex[:6]}")
    first = client.post("/v1/cases", json=body).json()
    second = client.post("/v1/cases", json=body).json()
    assert first["case_id"] == second["case_id"]


def test_one_reference_under_two_systems_is_two_cases_and_each_is_kept_apart(
    client: TestClient, engine: Engine
) -> None:
    """Two hospitals behind one partner number their orders alike: the system tells the orders apart."""
    ref = f"REF-{uuid.uuid4().hex[:6]}"
    answers = {
        system: client.post(
            "/v1/cases", json=dict(SAMPLE, partner_case_ref=ref, partner_case_ref_system=system)
        )
        for system in ("urn:oid:2.16.840.1.113883.19.5.1", "https://hospital-b.example/orders", None)
    }
    assert {a.status_code for a in answers.values()} == {201}, [a.text for a in answers.values()]
    assert len({a.json()["case_id"] for a in answers.values()}) == 3
    for system, answer in answers.items():
        assert (answer.json()["partner_case_ref"], answer.json()["partner_case_ref_system"]) == (ref, system)
        again = client.post(
            "/v1/cases", json=dict(SAMPLE, partner_case_ref=ref, partner_case_ref_system=system)
        )
        assert again.json()["case_id"] == answer.json()["case_id"]  # the same order again: the same case
    with Session(engine) as session:
        case = session.get(Case, answers["https://hospital-b.example/orders"].json()["case_id"])
        assert case is not None
        assert handlers.case_input(case).partner_case_ref_system == "https://hospital-b.example/orders"
    # A system is a namespace: the same value under one system is still one patient's order.
    other_patient = copy.deepcopy(SAMPLE) | {
        "partner_case_ref": ref,
        "partner_case_ref_system": "urn:oid:2.16.840.1.113883.19.5.1",
    }
    other_patient["patient"]["given_name"] = "Mary"
    refused = client.post("/v1/cases", json=other_patient)
    assert refused.status_code == 409 and "Mary" not in refused.text


@pytest.mark.parametrize(
    ("sent", "rule"),
    [
        ({"partner_case_ref": "R-1", "partner_case_ref_system": "Jane Doe placer"}, "absolute URI"),
        ({"partner_case_ref": "R-1", "partner_case_ref_system": "urn:x:" + "y" * 300}, "at most 255"),
        ({"partner_case_ref_system": "urn:oid:1.2.3"}, "send partner_case_ref too"),
    ],
    ids=["not a URI", "too long", "a system without a reference"],
)
def test_a_reference_system_that_is_not_a_uri_is_a_problem_naming_the_field_without_echo(
    client: TestClient, sent: dict[str, str], rule: str
) -> None:
    response = client.post("/v1/cases", json=dict(SAMPLE, **sent))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert error["field"] == "partner_case_ref_system" and rule in error["message"]
    assert "Jane Doe placer" not in response.text and "yyyy" not in response.text


def test_the_same_reference_sent_concurrently_is_one_case_with_one_timeline(
    client: TestClient, engine: Engine
) -> None:
    """The case is inserted at once and the unique (partner, reference) constraint finds a repeat: eight
    simultaneous requests all get the one case, and nothing of the others is left behind."""
    ref = f"REF-{uuid.uuid4().hex[:6]}"
    body = dict(SAMPLE, partner_case_ref=ref)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/cases", json=body), range(8)))
    assert {a.status_code for a in answers} <= {200, 201}, [a.text for a in answers]
    [case_id] = {a.json()["case_id"] for a in answers}
    with Session(engine) as session:
        assert len(session.exec(select(Case).where(Case.partner_case_ref == ref)).all()) == 1
        timeline = session.exec(select(CaseTimelineEntry).where(CaseTimelineEntry.case_id == case_id)).all()
        assert [t.status for t in timeline] == [CaseStatus.INTAKE]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["patient"].pop("birth_date"), "patient.birth_date"),
        (lambda b: b["patient"].update(state="California"), "patient.state"),
        (lambda b: b["referring"].update(npi="12"), "referring.npi"),
        (lambda b: b.update(reason="curiosity"), "reason"),
        (lambda b: b.update(is_admin=True), "is_admin"),
    ],
)
def test_malformed_request_is_422_naming_the_field_without_echoing_values(
    client: TestClient, engine: Engine, mutate, field
) -> None:
    body = copy.deepcopy(SAMPLE)
    mutate(body)
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["errors"]]
    assert "Jane" not in response.text and "1984-03-02" not in response.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


def test_a_body_larger_than_a_json_request_may_be_is_413_and_nothing_is_stored(
    client: TestClient, engine: Engine
) -> None:
    """The ingress lets bodies up to records' upload limits through; intake bounds its own as they arrive."""
    body = dict(SAMPLE, clinical_question="x" * MAX_JSON_BODY_BYTES)
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Jane" not in response.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


def test_a_nul_character_in_a_text_is_422_and_no_case_carries_it_to_the_services(
    client: TestClient, engine: Engine
) -> None:
    """PostgreSQL cannot store a NUL in a text: taken, it would fail every service the case reaches."""
    body = dict(SAMPLE, clinical_question="Complex mass\u0000, left ovary")
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert "NUL character" in response.json()["detail"] and "ovary" not in response.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


@pytest.mark.parametrize(
    ("patient", "exam", "named"),
    [
        ({"birth_date": "2099-03-02"}, {}, "patient.birth_date (FHIR: Patient.birthDate) is in the future"),
        (
            {},
            {"performed_on": "2099-11-20"},
            "exam.performed_on (FHIR: ImagingStudy.started) is in the future",
        ),
        ({"birth_date": "2001-05-05"}, {"performed_on": "2000-01-01"}, "exam.performed_on is before"),
    ],
    ids=["born in the future", "examined in the future", "examined before birth"],
)
def test_dates_no_real_request_carries_are_422_naming_them_and_nothing_is_stored(
    client: TestClient, engine: Engine, patient: dict[str, str], exam: dict[str, str], named: str
) -> None:
    body = copy.deepcopy(SAMPLE)
    body["patient"].update(patient)
    body["exam"].update(exam)
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert named in response.json()["detail"]
    assert not any(value in response.text for value in (*patient.values(), *exam.values()))
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


def test_unservable_request_is_422_with_the_reason(client: TestClient) -> None:
    body = dict(SAMPLE, procedure_scheduled_on="2020-01-01")
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert "not in the future" in response.json()["detail"]


def test_an_mrn_a_dicom_patient_id_cannot_carry_is_refused_without_echo(
    client: TestClient, engine: Engine
) -> None:
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    body = copy.deepcopy(SAMPLE)
    body["patient"]["mrn"] = "MRN\\0042"
    body["partner_case_ref"] = "MRN-BACKSLASH"
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert "patient.mrn" in response.json()["detail"] and "0042" not in response.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


def test_unknown_case_is_404(client: TestClient) -> None:
    response = client.get(f"/v1/cases/{uuid.uuid4()}")
    assert response.status_code == 404
    assert "no case" in response.json()["detail"]


def test_status_events_are_mirrored_and_delivery_is_recorded_once(client: TestClient, engine: Engine) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    at = datetime.now(UTC) + timedelta(seconds=1)
    status_event = new_event(
        id=f"wf:{case_id}:1",
        source="/workflows/case",
        subject=case_id,
        data=CaseStatusChanged(case_id=case_id, status=CaseStatus.AWAITING_RECORDS, previous=None, at=at),
    )
    deliver = new_event(
        id=f"wf:{case_id}:9",
        source="/workflows/case",
        subject=case_id,
        data=DeliverReport(
            case_id=case_id, report_id="rp1", pdf_url="http://r/pdf", fhir_url="http://r/fhir"
        ),
    )
    for event in (status_event, deliver):
        with Session(engine) as session:
            consumer.handle(session, event)
            session.add(Inbox(message_id=event.id, queue="intake", message_type=event.type))
            session.commit()
    case = client.get(f"/v1/cases/{case_id}").json()
    assert case["status"] == "awaiting_records"
    assert [t["status"] for t in case["timeline"]] == ["intake", "awaiting_records"]
    assert case["report"]["pdf_url"] == "http://r/pdf"
    with Session(engine) as session:
        outbox = session.exec(select(Outbox).where(Outbox.routing_key == "report.delivered")).all()
        assert [o.message_id for o in outbox if case_id.encode() in o.body] == [
            f"{deliver.id}>report.delivered"
        ]
        [delivered] = [CloudEvent.model_validate_json(o.body) for o in outbox if case_id.encode() in o.body]
    # What happened, said plainly: posted to the partner's system for the physician, not "to the physician".
    assert delivered.data["recipient"].startswith("partner ")
    assert "for the referring physician (NPI " in delivered.data["recipient"]


def test_unknown_message_type_is_poison(engine: Engine) -> None:
    event = new_event(
        id="x1", source="/t", subject="c", type="records.collect",
        data=CaseStatusChanged(case_id="c", status=CaseStatus.CLOSED, previous=None, at=datetime.now(UTC)),
    )  # fmt: skip
    with Session(engine) as session, pytest.raises(PoisonMessage, match="does not handle"):
        consumer.handle(session, event)


def test_operations_may_create_for_a_named_partner_but_a_partner_only_for_itself(
    client: TestClient, auth: Engine, partner: dict[str, str]
) -> None:
    other = client.post("/v1/cases", json=dict(SAMPLE, partner_id="someone-else"))
    assert other.status_code == 422 and "another partner" in other.json()["detail"]
    own = client.post("/v1/cases", json=dict(SAMPLE, partner_id=partner["partner_id"]))
    assert own.status_code == 201


def object_routes(case_id: str) -> list[tuple[str, str, dict | None]]:
    document = {
        "kind": "clinical_note",
        "title": "note",
        "content_type": "text/plain",
        "content_base64": "aGk=",
    }
    return [
        ("GET", f"/v1/cases/{case_id}", None),
        ("POST", f"/v1/cases/{case_id}/cancel", {"reason": "patient withdrew"}),
        ("POST", f"/v1/cases/{case_id}/documents", document),
        ("POST", f"/v1/cases/{case_id}/questions", {"text": "Is MRI needed?"}),
    ]


def test_cross_tenant_every_route_with_a_case_id_is_404_and_audited(
    client: TestClient, engine: Engine, auth: Engine
) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    intruder = new_partner(auth, "Clinic B")
    with Session(engine) as session:
        documents_before = len(session.exec(select(CaseDocument)).all())
    for method, path, body in object_routes(case_id):
        response = client.request(
            method, path, json=body, headers={"Authorization": intruder["Authorization"]}
        )
        assert response.status_code == 404, (path, response.text)
        assert response.json()["detail"].startswith("no case")
    with Session(auth) as session:
        denied = session.exec(
            select(AuditEvent).where(AuditEvent.case_id == case_id, AuditEvent.outcome == "denied")
        ).all()
    assert len(denied) == len(object_routes(case_id))
    assert {d.partner_id for d in denied} == {intruder["partner_id"]}
    with Session(engine) as session:
        assert len(session.exec(select(CaseDocument)).all()) == documents_before
    listed = client.get("/v1/cases", headers={"Authorization": intruder["Authorization"]}).json()
    assert listed["items"] == []
    spying = client.get(
        "/v1/cases", params={"partner_id": client.get(f"/v1/cases/{case_id}").json()["partner_id"]},
        headers={"Authorization": intruder["Authorization"]},
    )  # fmt: skip
    assert spying.json()["items"] == []


def test_every_phi_read_and_write_is_audited_with_who_what_and_outcome(
    client: TestClient, auth: Engine, partner: dict[str, str]
) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    client.get(f"/v1/cases/{case_id}")
    with Session(auth) as session:
        entries = session.exec(
            select(AuditEvent).where(AuditEvent.case_id == case_id).order_by(col(AuditEvent.id))
        ).all()
    assert [(e.action, e.outcome, e.partner_id) for e in entries] == [
        ("create", "success", partner["partner_id"]),
        ("read", "success", partner["partner_id"]),
    ]
    assert all(e.actor.startswith("key:") and e.purpose == "TREAT" and e.service == "intake" for e in entries)


def test_list_filters_and_walks_pages_with_a_cursor(client: TestClient, auth: Engine) -> None:
    own = new_partner(auth, "Lister")
    headers = {"Authorization": own["Authorization"]}
    created = [client.post("/v1/cases", json=SAMPLE, headers=headers).json()["case_id"] for _ in range(5)]
    urgent = dict(SAMPLE, reason="invasive_procedure_planned", procedure_scheduled_on="2099-01-10")
    created.append(client.post("/v1/cases", json=urgent, headers=headers).json()["case_id"])

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/cases", params=params, headers=headers).json()
        seen += [c["case_id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))  # newest first, each once

    only_urgent = client.get("/v1/cases", params={"urgency": "urgent"}, headers=headers).json()["items"]
    assert [c["case_id"] for c in only_urgent] == [created[-1]]
    assert client.get("/v1/cases", params={"status": "closed"}, headers=headers).json()["items"] == []
    future = client.get("/v1/cases", params={"created_from": "2099-01-01T00:00:00Z"}, headers=headers)
    assert future.json()["items"] == []
    past = client.get("/v1/cases", params={"created_to": "2000-01-01T00:00:00Z"}, headers=headers)
    assert past.json()["items"] == []
    bad = client.get("/v1/cases", params={"cursor": "not-a-cursor"}, headers=headers)
    assert bad.status_code == 422 and "next_cursor" in bad.json()["detail"]


@pytest.mark.parametrize("field", ["created_from", "created_to"])
def test_a_time_filter_without_an_offset_is_utc_and_one_utc_cannot_hold_is_a_422(
    client: TestClient, auth: Engine, field: str
) -> None:
    """A date ("2026-12-01") or a time without an offset was a 500 (the column takes only aware times), and so
    was one whose UTC falls in year 0 or 10000."""
    headers = {"Authorization": new_partner(auth, "Filtered")["Authorization"]}
    case_id = client.post("/v1/cases", json=SAMPLE, headers=headers).json()["case_id"]
    today = datetime.now(UTC).date()
    for sent in (today.isoformat(), f"{today}T00:00:00"):
        listed = client.get("/v1/cases", params={field: sent}, headers=headers)
        assert listed.status_code == 200, listed.text
        expected = [case_id] if field == "created_from" else []
        assert [c["case_id"] for c in listed.json()["items"]] == expected
    for sent in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"):
        refused = client.get("/v1/cases", params={field: sent}, headers=headers)
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == f"query.{field}"
        assert "years 1 to 9999" in refused.json()["errors"][0]["message"]


def test_a_tampered_cursor_is_a_422_whatever_it_holds(client: TestClient) -> None:
    """A cursor is base64 JSON: one edited to a time UTC cannot hold, or to an id with a lone surrogate, was a
    500; one with a NUL in its id was answered "cannot be stored"."""
    for raw in (
        b'{"c": "0001-01-01T00:00:00+23:59", "i": "x"}',
        b'{"c": "9999-12-31T23:59:59-23:59", "i": "x"}',
        b'{"c": "2026-12-01T00:00:00+00:00", "i": "\\ud800"}',
        b'{"c": "2026-12-01T00:00:00+00:00", "i": "\\u0000"}',
        b'{"c": "2026-12-01T00:00:00+00:00", "i": {"id": 1}}',
        b'["c", "i"]',
    ):
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        bad = client.get("/v1/cases", params={"cursor": cursor})
        assert bad.status_code == 422 and "next_cursor" in bad.json()["detail"], raw[:40]


def test_a_consent_document_puts_consent_on_file(client: TestClient, engine: Engine) -> None:
    case = client.post("/v1/cases", json=dict(SAMPLE, consent_on_file=False)).json()
    assert case["consent_on_file"] is False
    form = {
        "kind": "records_release_authorization",
        "title": "Signed release",
        "content_type": "application/pdf",
        "content_base64": base64.b64encode(b"%PDF-1.4 signed").decode(),
    }
    added = client.post(f"/v1/cases/{case['case_id']}/documents", json=form)
    assert added.status_code == 201, added.text
    assert added.json()["size"] == len(b"%PDF-1.4 signed")
    assert client.get(f"/v1/cases/{case['case_id']}").json()["consent_on_file"] is True
    with Session(engine) as session:
        stored = session.get(Case, case["case_id"])
        assert stored is not None and handlers.case_input(stored).consent_on_file is True


def test_document_with_bad_content_is_422_and_nothing_is_stored(client: TestClient, engine: Engine) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    bad = {
        "kind": "clinical_note",
        "title": "x",
        "content_type": "text/plain",
        "content_base64": "!!not base64!!",
    }
    response = client.post(f"/v1/cases/{case_id}/documents", json=bad)
    assert response.status_code == 422 and "base64" in response.json()["detail"]
    with Session(engine) as session:
        assert session.exec(select(CaseDocument).where(CaseDocument.case_id == case_id)).all() == []


def test_questions_wait_for_delivery(client: TestClient) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    response = client.post(f"/v1/cases/{case_id}/questions", json={"text": "Is MRI needed?"})
    assert response.status_code == 409 and "after the report is delivered" in response.json()["detail"]


def test_cancellation_event_marks_the_case_cancelled_once(client: TestClient, engine: Engine) -> None:
    case_id = client.post("/v1/cases", json=SAMPLE).json()["case_id"]
    event = new_event(
        id=f"wf:{case_id}:cancel", source="/workflows/case", subject=case_id,
        data=CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="key:x"),
    )  # fmt: skip
    for _ in range(2):
        with Session(engine) as session:
            consumer.handle(session, event)
            session.commit()
    case = client.get(f"/v1/cases/{case_id}").json()
    assert case["status"] == "cancelled"
    assert [t["status"] for t in case["timeline"]] == ["intake", "cancelled"]
    refused = client.post(f"/v1/cases/{case_id}/cancel", json={"reason": "again please"})
    assert refused.status_code == 409 and "already cancelled" in refused.json()["detail"]


def test_the_case_list_reads_one_index_of_partner_status_and_age(engine: Engine) -> None:
    # With 10,000 open cases GET /v1/cases?status=… must read a page, not filter the table (make bench scale).
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("cases")}
    assert indexes["ix_cases_partner_status_created"] == ["partner_id", "status", "created_at", "id"]
