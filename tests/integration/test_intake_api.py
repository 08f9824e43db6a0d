"""Intake's case API and consumer on the real PostgreSQL (no Temporal: the reconciler starts workflows)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CaseStatusChanged, DeliverReport, new_event
from contracts.models import CaseStatus
from services.common import migrate
from services.common.config import Settings
from services.common.db import Inbox, Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import create_app
from services.intake import api, consumer
from services.intake.models import Case

SAMPLE = {
    "partner_id": "clinic-a",
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
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app("intake", routers=[api.router], engine=lambda: engine)
    app.dependency_overrides[api.intake_engine] = lambda: engine
    app.dependency_overrides[api.temporal_client] = lambda: None  # Temporal down: the case must still be kept
    with TestClient(app) as c:
        yield c


def test_create_case_stores_it_with_triage_and_no_phi_in_the_answer(
    client: TestClient, engine: Engine
) -> None:
    response = client.post("/v1/cases", json=SAMPLE)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "intake"
    assert body["urgency"] == "priority"
    assert body["subspecialty"] == "gynecologic_imaging"
    assert body["workflow_id"] == f"case-{body['case_id']}"
    assert "Jane" not in response.text and "MRN-0042" not in response.text
    with Session(engine) as session:
        case = session.get(Case, body["case_id"])
        assert case is not None and case.workflow_started is False  # the reconciler will start it
    assert body["case_id"] in {c.id for c in api.unstarted_cases(engine)}
    assert client.get(f"/v1/cases/{body['case_id']}").json()["timeline"][0]["status"] == "intake"


def test_same_partner_reference_never_creates_a_second_case(client: TestClient) -> None:
    body = dict(SAMPLE, partner_case_ref=f"REF-{uuid.uuid4().hex[:6]}")
    first = client.post("/v1/cases", json=body).json()
    second = client.post("/v1/cases", json=body).json()
    assert first["case_id"] == second["case_id"]


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


def test_unservable_request_is_422_with_the_reason(client: TestClient) -> None:
    body = dict(SAMPLE, procedure_scheduled_on="2020-01-01")
    response = client.post("/v1/cases", json=body)
    assert response.status_code == 422
    assert "not in the future" in response.json()["detail"]


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


def test_unknown_message_type_is_poison(engine: Engine) -> None:
    event = new_event(
        id="x1", source="/t", subject="c", type="records.collect",
        data=CaseStatusChanged(case_id="c", status=CaseStatus.CLOSED, previous=None, at=datetime.now(UTC)),
    )  # fmt: skip
    with Session(engine) as session, pytest.raises(PoisonMessage, match="does not handle"):
        consumer.handle(session, event)
