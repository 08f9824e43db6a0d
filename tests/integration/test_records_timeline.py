"""Other records (FHIR DiagnosticReport, Observation, DocumentReference), each dated, and the case's
chronological timeline, through the API on the real PostgreSQL."""

import json
import uuid
from collections.abc import Iterator, Mapping
from datetime import date

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, CollectRecords, Exam, Patient, RecordsAssembled, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Outbox, make_engine
from services.common.http import create_app
from services.records import api, consumer, timeline
from tests.dicom_factory import make_us_instance
from tests.keys import operations_headers

FHIR = "application/fhir+json"
DIAGNOSTIC_REPORT = {
    "resourceType": "DiagnosticReport",
    "status": "final",
    "code": {"text": "US pelvis"},
    "effectiveDateTime": "2026-11-20T10:15:00Z",
    "conclusion": "Complex left adnexal cyst, O-RADS US 4.",
}
OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "10334-1", "display": "CA-125"}]},
    "effectiveDateTime": "2026-11-18",
    "valueQuantity": {"value": 48, "unit": "U/mL"},
}
DOCUMENT = {
    "resourceType": "DocumentReference",
    "status": "current",
    "date": "2026-11-22T08:00:00Z",
    "type": {"text": "Pathology report"},
    "content": [{"attachment": {"contentType": "text/plain", "data": "Tm8gbWFsaWduYW5jeS4="}}],
}


@pytest.fixture(scope="module")
def setup(settings: Settings) -> Iterator[tuple[TestClient, Engine]]:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "records", routers=[api.router, timeline.router], engine=lambda: engine, max_body_bytes=None
    )
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c, engine


def open_case(engine: Engine, settings: Settings) -> str:
    case_id = str(uuid.uuid4())
    command = CollectRecords(
        case_id=case_id,
        patient=Patient(
            family_name="Doe",
            given_name="Jane",
            birth_date=date(1980, 1, 1),
            sex="female",
            mrn="MRN1",
            state="CA",
        ),
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 20), facility="Bayview"),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    return case_id


def as_file(name: str, resource: Mapping[str, object]) -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (name, json.dumps(resource).encode(), FHIR))


def test_fhir_records_are_dated_and_the_timeline_is_chronological(
    setup: tuple[TestClient, Engine], settings: Settings
) -> None:
    client, engine = setup
    case_id = open_case(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    image = make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=4)
    response = client.post(
        f"/v1/records/{case_id}/files",
        files=[
            as_file("dr.json", DIAGNOSTIC_REPORT),
            as_file("ca125.json", OBSERVATION),
            as_file("path.json", DOCUMENT),
            ("files", ("a.dcm", image, "application/dicom")),
        ],
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "assembled"
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.routing_key == "records.assembled")).all()
    [event] = [
        RecordsAssembled.model_validate(e.data)
        for e in (CloudEvent.model_validate_json(r.body) for r in rows)
        if e.subject == case_id
    ]
    assert event.report.content_type == FHIR and event.report.text == DIAGNOSTIC_REPORT["conclusion"]

    entries = client.get(f"/v1/records/{case_id}/timeline").json()
    assert [(e["date"], e["category"], e["record_type"]) for e in entries] == [
        ("2026-11-18", "clinical", "Observation"),
        ("2026-11-20", "imaging_study", "US study"),
        ("2026-11-20", "report", "DiagnosticReport"),
        ("2026-11-22", "clinical", "DocumentReference"),
    ]
    assert entries[1]["study_instance_uid"] == study
    assert "Doe" not in json.dumps(entries)


def test_invalid_or_unknown_json_is_refused_by_field_name(
    setup: tuple[TestClient, Engine], settings: Settings
) -> None:
    client, engine = setup
    case_id = open_case(engine, settings)
    broken = {**OBSERVATION, "effectiveDateTime": "DOE-JANE-not-a-date"}
    refused = client.post(f"/v1/records/{case_id}/files", files=[as_file("x.json", broken)])
    assert refused.status_code == 422
    assert (
        "is a FHIR Observation that does not validate (fields: effectiveDateTime)" in refused.json()["detail"]
    )
    assert "DOE-JANE" not in refused.text
    other = client.post(
        f"/v1/records/{case_id}/files", files=[as_file("p.json", {"resourceType": "Patient"})]
    )
    assert other.status_code == 422 and "not a FHIR DiagnosticReport" in other.json()["detail"]
    assert client.get(f"/v1/records/{case_id}/timeline").json() == []
