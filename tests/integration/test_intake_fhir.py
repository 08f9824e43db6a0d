"""FHIR R4 intake on the real PostgreSQL: the transaction Bundle round trip, validation, Task status."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CaseStatusChanged, new_event
from contracts.models import CaseStatus
from services.auth import auth_engine
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.intake import api, consumer, fhir_api, fhir_intake, handlers
from services.intake.models import Case, CaseDocument
from tests.integration.test_intake_api import SAMPLE, new_partner
from tests.unit.test_http_body_guard import on_event_loop

REPORT = base64.b64encode(b"PELVIC ULTRASOUND: 4 cm complex adnexal mass.").decode()
FORM = base64.b64encode(b"%PDF-1.4 signed release").decode()

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat",
    "identifier": [{"system": "urn:bayview:mrn", "value": "MRN-0042"}],
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "gender": "female",
    "birthDate": "1984-03-02",
    "address": [{"state": "CA"}],
    "managingOrganization": {"display": "Bayview Women's Clinic"},
}
SERVICE_REQUEST: dict[str, Any] = {
    "resourceType": "ServiceRequest",
    "identifier": [{"system": "urn:bayview:order", "value": "ORD-1"}],
    "status": "active",
    "intent": "order",
    "code": {"text": "second opinion on a diagnostic ultrasound"},
    "subject": {"reference": "Patient/pat"},
    "requester": {
        "display": "Dr. Alex Kim",
        "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
    },
    "reasonCode": [{"coding": [{"system": "urn:secondopinion:reason", "code": "possible_malignancy"}]}],
    "note": [{"text": "Complex adnexal mass: benign or suspicious?"}],
}
COVERAGE = {
    "resourceType": "Coverage",
    "status": "active",
    "subscriberId": "W123456789",
    "beneficiary": {"reference": "Patient/pat"},
    "payor": [{"display": "Acme Health"}],
    "class": [{"type": {"coding": [{"code": "plan"}]}, "value": "ACME-PPO"}],
}
CONSENT = {
    "resourceType": "Consent",
    "status": "active",
    "scope": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
        ]
    },
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": "Patient/pat"},
}
REPORT_DOC = {
    "resourceType": "DocumentReference",
    "status": "current",
    "type": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
    "subject": {"reference": "Patient/pat"},
    "content": [{"attachment": {"contentType": "text/plain", "data": REPORT, "title": "Original report"}}],
}
FORM_DOC = {
    "resourceType": "DocumentReference",
    "status": "current",
    "type": {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]},
    "content": [{"attachment": {"contentType": "application/pdf", "data": FORM, "title": "Signed release"}}],
}
STUDY = {
    "resourceType": "ImagingStudy",
    "status": "available",
    "subject": {"reference": "Patient/pat"},
    "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"}],
    "started": "2026-11-20T10:00:00Z",
    "procedureCode": [{"coding": [{"code": "pelvic"}], "text": "pelvic"}],
    "location": {"display": "Bayview Imaging"},
    "endpoint": [{"reference": "Endpoint/pacs"}],
}
ENDPOINT = {
    "resourceType": "Endpoint",
    "id": "pacs",
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "payloadType": [{"text": "DICOM"}],
    "address": "https://pacs.bayview.example/dicomweb",
}


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in resources
        ],
    }


FULL = bundle(PATIENT, SERVICE_REQUEST, COVERAGE, CONSENT, REPORT_DOC, STUDY, ENDPOINT)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    intake, auth = make_engine("intake", settings), make_engine("auth", settings)
    migrate.upgrade("intake", intake)
    migrate.upgrade("auth", auth)
    return intake


@pytest.fixture(scope="module")
def auth(settings: Settings, engine: Engine) -> Engine:
    return make_engine("auth", settings)


@pytest.fixture(scope="module")
def client(engine: Engine, auth: Engine) -> Iterator[TestClient]:
    app = create_app("intake", routers=[api.router, fhir_api.router], engine=lambda: engine)
    app.dependency_overrides[api.intake_engine] = lambda: engine
    app.dependency_overrides[auth_engine] = lambda: auth
    app.dependency_overrides[api.temporal_client] = lambda: None
    partner = new_partner(auth, "FHIR Hospital")
    with TestClient(app, headers={"Authorization": partner["Authorization"]}) as c:
        yield c


def post_fhir(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(path, json=body, headers={"Content-Type": "application/fhir+json", **(headers or {})})


def case_task(response: Any) -> dict[str, Any]:
    """The order as kept (a ServiceRequest, its id the case's and its Task's) from a create (201) or a transaction
    (200, a transaction-response Bundle)."""
    body = response.json()
    if body.get("resourceType") != "Bundle":
        return body  # type: ignore[no-any-return]
    (order_,) = [
        e["resource"]
        for e in body["entry"]
        if (e.get("resource") or {}).get("resourceType") == "ServiceRequest"
    ]
    return order_  # type: ignore[no-any-return]


def test_transaction_bundle_round_trip_to_a_task_that_follows_the_case(
    client: TestClient, engine: Engine
) -> None:
    created = post_fhir(client, "/fhir", FULL)
    # A transaction is answered with a transaction-response Bundle: an entry per request entry, in order;
    # the ServiceRequest's carries the order as kept and where to read it (FHIR R4 http.html#transaction); its
    # id is the case's, and the case's Task's.
    assert created.status_code == 200, created.text
    assert created.headers["content-type"].startswith("application/fhir+json")
    answer = Bundle.model_validate(created.json())
    assert answer.type == "transaction-response"
    assert len(answer.entry) == len(FULL["entry"])
    (done,) = [e for e in answer.entry if e.resource is not None]
    assert FULL["entry"][answer.entry.index(done)]["resource"]["resourceType"] == "ServiceRequest"
    kept = ServiceRequest.model_validate(done.resource.model_dump(mode="json"))
    assert done.response.status.startswith("201")
    assert done.response.location == f"{get_settings().intake_url}/fhir/ServiceRequest/{kept.id}/_history/1"
    assert client.get(done.response.location).json()["id"] == kept.id
    task = Task.model_validate(client.get(f"/fhir/Task/{kept.id}").json())
    assert task.status == "received"
    assert "Jane" not in created.text and "MRN-0042" not in created.text

    with Session(engine) as session:
        case = session.get(Case, task.id)
        assert case is not None
        sent = handlers.case_input(case)
        documents = session.exec(select(CaseDocument).where(CaseDocument.case_id == case.id)).all()
    assert (sent.patient.family_name, sent.patient.birth_date.isoformat(), sent.patient.state) == (
        "Doe",
        "1984-03-02",
        "CA",
    )
    assert (sent.referring.npi, sent.referring.organization) == ("1234567893", "Bayview Women's Clinic")
    assert (sent.exam.exam_type, sent.exam.performed_on.isoformat()) == ("pelvic", "2026-11-20")
    assert sent.exam.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert (sent.coverage.plan_code, sent.coverage.member_id) == ("ACME-PPO", "W123456789")
    assert sent.reason == "possible_malignancy" and sent.consent_on_file is True
    assert case.urgency == "priority" and case.partner_case_ref == "ORD-1"
    assert [(d.kind, d.size) for d in documents] == [("original_report", len(base64.b64decode(REPORT)))]

    for step, (status, expected) in enumerate(
        [(CaseStatus.IN_REVIEW, "in-progress"), (CaseStatus.CLOSED, "completed")], start=1
    ):
        event = new_event(
            id=f"wf:{task.id}:{step}", source="/workflows/case", subject=task.id,
            data=CaseStatusChanged(case_id=str(task.id), status=status, previous=None,
                                   at=datetime.now(UTC) + timedelta(seconds=step)),
        )  # fmt: skip
        with Session(engine) as session:
            consumer.handle(session, event)
            session.commit()
        shown = client.get(f"/fhir/Task/{task.id}")
        assert Task.model_validate(shown.json()).status == expected

    again = post_fhir(client, "/fhir", FULL)  # the same order reference never makes a second case
    assert case_task(again)["id"] == task.id


def test_without_consent_the_case_waits_and_a_signed_form_document_counts_as_consent(
    client: TestClient, engine: Engine
) -> None:
    no_consent = bundle(PATIENT, dict(SERVICE_REQUEST, identifier=[{"value": "ORD-2"}]), REPORT_DOC, STUDY)
    task = case_task(post_fhir(client, "/fhir", no_consent))
    assert client.get(f"/v1/cases/{task['id']}").json()["consent_on_file"] is False
    with_form = bundle(PATIENT, dict(SERVICE_REQUEST, identifier=[{"value": "ORD-3"}]), FORM_DOC, STUDY)
    task = case_task(post_fhir(client, "/fhir", with_form))
    assert client.get(f"/v1/cases/{task['id']}").json()["consent_on_file"] is True


def test_service_request_with_contained_resources(client: TestClient) -> None:
    request = dict(
        SERVICE_REQUEST,
        identifier=[{"value": "ORD-4"}],
        subject={"reference": "#pat"},
        contained=[
            PATIENT,
            dict(STUDY, subject={"reference": "#pat"}, endpoint=None),
            dict(CONSENT, patient={"reference": "#pat"}),
        ],
    )
    request["contained"][1].pop("endpoint")
    created = post_fhir(client, "/fhir/ServiceRequest", request)
    assert created.status_code == 201, created.text
    assert ServiceRequest.model_validate(created.json()).status == "active"
    assert client.get(f"/fhir/Task/{created.json()['id']}").json()["status"] == "received"


@pytest.mark.parametrize(
    ("mutate", "element"),
    [
        (lambda b: b["entry"][0]["resource"].update(birthDate="02/03/1984"), "Bundle.entry[0].resource.birthDate"),
        (lambda b: b["entry"][0]["resource"].update(gender="woman"), "Patient.gender"),
        (lambda b: b["entry"][1]["resource"].pop("intent"), "Bundle.entry[1].resource.intent"),
        (lambda b: b["entry"][0]["resource"].pop("address"), "Patient.address[0].state"),
        (lambda b: b["entry"][1]["resource"].update(reasonCode=[{"text": "curiosity"}]), "ServiceRequest.reasonCode[0].coding[0].code"),
        (lambda b: b["entry"][1]["resource"]["requester"]["identifier"].update(value="12"), "ServiceRequest.requester.identifier.value"),
        (lambda b: b["entry"].pop(5), "ImagingStudy"),
        (lambda b: b.update(type="batch"), "Bundle.type"),
        (lambda b: b["entry"].append({"resource": {"resourceType": "MedicationRequest"}}), "Bundle.entry[7].resource.resourceType"),
    ],
)  # fmt: skip
def test_invalid_resource_is_an_operation_outcome_naming_the_element(
    client: TestClient, engine: Engine, mutate: Any, element: str
) -> None:
    body = copy.deepcopy(FULL)
    mutate(body)
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = post_fhir(client, "/fhir", body)
    assert response.status_code == 422, response.text
    outcome = OperationOutcome.model_validate(response.json())
    assert element in [e for issue in outcome.issue for e in issue.expression or []]
    assert "Jane" not in response.text and "1984" not in response.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


def test_a_body_that_is_not_json_is_a_400_operation_outcome(client: TestClient) -> None:
    """FHIR R4 http.html: a body that cannot be parsed is a 400 (it was a 422, kept for a resource that breaks a rule)."""
    garbage = client.post(
        "/fhir", content=b"\xff\xfe not json", headers={"Content-Type": "application/fhir+json"}
    )
    assert garbage.status_code == 400
    assert OperationOutcome.model_validate(garbage.json()).issue[0].code == "structure"


def test_another_partners_task_is_404(client: TestClient, auth: Engine) -> None:
    task = case_task(
        post_fhir(
            client, "/fhir", bundle(PATIENT, dict(SERVICE_REQUEST, identifier=[{"value": "ORD-9"}]), STUDY)
        )
    )
    other = new_partner(auth, "Other Hospital")
    response = client.get(f"/fhir/Task/{task['id']}", headers={"Authorization": other["Authorization"]})
    assert response.status_code == 404
    assert OperationOutcome.model_validate(response.json()).issue[0].code == "not-found"


def test_errors_name_the_element_never_echo_what_was_sent_in_it(client: TestClient) -> None:
    """A resourceType, or a Task id in the URL, is whatever the client typed, possibly a patient's name."""
    body = order({"value": "ECHO-1"})
    body["entry"].append({"resource": {"resourceType": "Jane Doe 1984-03-02"}})
    refused = post_fhir(client, "/fhir", body)
    assert refused.status_code == 422
    [issue] = OperationOutcome.model_validate(refused.json()).issue
    assert issue.expression == [f"Bundle.entry[{len(body['entry']) - 1}].resource.resourceType"]
    assert "Jane" not in refused.text and "ServiceRequest" in (issue.diagnostics or "")
    missing = client.get("/fhir/Task/Jane%20Doe%201984-03-02")
    assert missing.status_code == 404 and "Jane" not in missing.text


def obstetric(weeks: float, planned: str | None = None) -> dict[str, Any]:
    study = dict(STUDY, procedureCode=[{"coding": [{"code": "obstetric"}]}])
    request = dict(
        SERVICE_REQUEST,
        identifier=[{"value": f"OB-{weeks}-{planned}"}],
        reasonCode=[{"coding": [{"code": "fetal_anomaly"}]}],
    )
    gestational_age = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "49051-6"}]},
        "valueQuantity": {"value": weeks, "unit": "wk", "system": "http://unitsofmeasure.org", "code": "wk"},
    }
    resources = [PATIENT, request, CONSENT, study, gestational_age]
    if planned:
        resources.append(
            {
                "resourceType": "Procedure",
                "status": "preparation",
                "subject": {"reference": "Patient/pat"},
                "performedDateTime": planned,
            }
        )
    return bundle(*resources)


def test_obstetric_triage_reads_gestational_age_and_the_planned_procedure(
    client: TestClient, engine: Engine
) -> None:
    created = post_fhir(client, "/fhir", obstetric(22))
    assert created.status_code == 200, created.text
    with Session(engine) as session:
        case = session.get(Case, case_task(created)["id"])
        assert case is not None and case.urgency == "urgent"
        assert case.subspecialty == "maternal_fetal_medicine"

    too_far = post_fhir(client, "/fhir", obstetric(50))
    assert too_far.status_code == 422
    issue = OperationOutcome.model_validate(too_far.json()).issue[0]
    assert issue.expression == ["Observation.valueQuantity.value"]

    out_of_range = post_fhir(client, "/fhir", obstetric(3))
    assert out_of_range.status_code == 422 and "outside 6-42" in out_of_range.text

    past = post_fhir(client, "/fhir", obstetric(22, planned="2020-01-01"))
    assert past.status_code == 422
    assert OperationOutcome.model_validate(past.json()).issue[0].code == "business-rule"
    assert "not in the future" in past.text
    assert "2020-01-01" not in past.text  # a date of the patient's care is PHI: named, never echoed


def order(reference: dict[str, str], **patient: Any) -> dict[str, Any]:
    body = copy.deepcopy(FULL)
    body["entry"][1]["resource"]["identifier"] = [reference]
    body["entry"][0]["resource"].update(patient)
    return body


def test_a_reference_already_used_for_another_patient_is_refused_not_merged(
    client: TestClient, engine: Engine
) -> None:
    first = post_fhir(client, "/fhir", order({"system": "urn:hospital-a:order", "value": "777"}))
    assert first.status_code == 200, first.text
    other = order(
        {"system": "urn:hospital-a:order", "value": "777"},
        name=[{"family": "Roe", "given": ["Mary"]}],
        birthDate="1990-01-01",
    )
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    refused = post_fhir(client, "/fhir", other)
    assert refused.status_code == 409, refused.text
    assert "another patient" in OperationOutcome.model_validate(refused.json()).issue[0].diagnostics
    assert "Roe" not in refused.text and "Doe" not in refused.text
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before
    same = post_fhir(client, "/fhir", order({"system": "urn:hospital-a:order", "value": "777"}))
    assert case_task(same)["id"] == case_task(first)["id"]  # the same order again is the same case


def test_the_same_order_number_from_two_hospitals_is_two_cases_each_answered_with_its_system(
    client: TestClient, engine: Engine
) -> None:
    """One partner, two hospitals numbering their placer orders alike, the same patient: two orders."""
    systems = ("urn:hospital-a:order", "urn:hospital-b:order", None)
    tasks = {}
    for system in systems:
        reference = {"value": "888"} | ({"system": system} if system else {})
        created = post_fhir(client, "/fhir", order(reference))
        assert created.status_code == 200, created.text
        tasks[system] = case_task(created)
    assert len({t["id"] for t in tasks.values()}) == 3
    # The order is answered as it was sent; one sent without a system, in the partner's namespace.
    assert tasks["urn:hospital-b:order"]["identifier"] == [{"system": "urn:hospital-b:order", "value": "888"}]
    assert tasks[None]["identifier"][0]["system"].startswith("urn:secondopinion:partner:")
    for system in systems:
        shown = client.get(f"/fhir/Task/{tasks[system]['id']}").json()
        assert [shown["groupIdentifier"]] == tasks[system]["identifier"]
        assert client.get(f"/v1/cases/{tasks[system]['id']}").json()["partner_case_ref_system"] == system
        reference = {"value": "888"} | ({"system": system} if system else {})
        assert case_task(post_fhir(client, "/fhir", order(reference)))["id"] == tasks[system]["id"]
    with Session(engine) as session:
        stored = session.get(Case, tasks["urn:hospital-a:order"]["id"])
        assert (
            stored is not None
            and handlers.case_input(stored).partner_case_ref_system == "urn:hospital-a:order"
        )


def test_an_order_stored_before_systems_were_kept_is_found_when_it_is_sent_again(
    client: TestClient, engine: Engine
) -> None:
    # Before intake migration 0006 the order's system was dropped; the migration marks such references "*".
    # The partner's interface engine resends the same order (with its system) after the upgrade: the same case.
    first = post_fhir(client, "/fhir", order({"system": "urn:hospital-c:order", "value": "999"}))
    case_id = case_task(first)["id"]
    with Session(engine) as session:
        stored = session.get(Case, case_id)
        assert stored is not None
        stored.partner_case_ref_system = handlers.UNKNOWN_SYSTEM  # as the migration leaves it
        session.add(stored)
        session.commit()
    handlers.forget_legacy_partners()  # what a process started after the migration reads

    again = post_fhir(client, "/fhir", order({"system": "urn:hospital-c:order", "value": "999"}))
    conditional = post_fhir(client, "/fhir", order({"value": "1000"}))  # an unrelated order: a new case

    assert case_task(again)["id"] == case_task(first)["id"]
    assert case_task(conditional)["id"] != case_id
    # Its system is unknown: the Task names it in the partner's namespace, never as "*".
    shown = client.get(f"/fhir/Task/{case_id}").json()["groupIdentifier"]
    assert shown["system"].startswith("urn:secondopinion:partner:") and shown["value"] == "999"
    assert client.get(f"/v1/cases/{case_id}").json()["partner_case_ref_system"] is None


def test_a_create_answers_where_the_order_is_read(client: TestClient) -> None:
    request = dict(
        SERVICE_REQUEST,
        identifier=[{"value": "LOC-1"}],
        subject={"reference": "#pat"},
        contained=[
            PATIENT,
            {k: v for k, v in STUDY.items() if k != "endpoint"} | {"subject": {"reference": "#pat"}},
        ],
    )
    created = post_fhir(client, "/fhir/ServiceRequest", request, headers={"Host": "attacker.example"})
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    # [base]/ServiceRequest/[id]/_history/1 at our public base (INTAKE_URL), whatever Host the request said
    assert location == f"{get_settings().intake_url}/fhir/ServiceRequest/{created.json()['id']}/_history/1"
    assert client.get(location).status_code == 200


def test_the_capability_statement_is_public_r4(client: TestClient) -> None:
    response = client.get("/fhir/metadata", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.fhirVersion == "4.0.1"
    served = {r.type: [i.code for i in r.interaction] for r in statement.rest[0].resource}
    assert served["ServiceRequest"] == ["create", "read", "vread", "search-type"]
    assert served["Task"] == ["read", "search-type"]
    assert [i.code for i in statement.rest[0].interaction] == ["transaction"]


def deeply_nested_extension() -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(300):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    return extension


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b["entry"][0]["resource"].update(contained=[{"resourceType": "Foo"}]),
        lambda b: b["entry"][0]["resource"].update(contained=[{"resourceType": 5}]),
        lambda b: b["entry"][0]["resource"].update(extension=[deeply_nested_extension()]),
    ],
    ids=["unknown contained type", "resourceType not a string", "extensions nested 300 deep"],
)
def test_a_resource_the_models_cannot_read_is_a_422_not_a_500(client: TestClient, damage: Any) -> None:
    body = order({"value": "X500"})
    damage(body)
    response = post_fhir(client, "/fhir", body)
    assert response.status_code == 422, response.text
    assert OperationOutcome.model_validate(response.json()).issue[0].severity == "error"


@pytest.mark.parametrize(
    ("damage", "element"),
    [
        (lambda b: b["entry"].insert(0, {"resource": "Patient/pat"}), "Bundle.entry[0].resource"),
        (lambda b: b["entry"].insert(0, {"resource": [PATIENT]}), "Bundle.entry[0].resource"),
        (lambda b: b["entry"][1].update(request="POST ServiceRequest"), "Bundle.entry[1].request"),
        (
            lambda b: b["entry"][1].update(request=[{"ifNoneExist": "identifier=X"}]),
            "Bundle.entry[1].request",
        ),
        (lambda b: b["entry"][1]["request"].update(ifNoneExist=5), "Bundle.entry[1].request.ifNoneExist"),
    ],
    ids=[
        "resource a string",
        "resource a list",
        "request a string",
        "request a list",
        "ifNoneExist a number",
    ],
)
def test_an_entry_whose_resource_or_request_is_not_an_object_is_a_422_naming_it(
    client: TestClient, damage: Any, element: str
) -> None:
    """The transaction looks for the ServiceRequest entry's ifNoneExist before the Bundle is validated: an
    entry whose resource or request was not an object was a 500 there."""
    body = order({"value": "ENTRY-1"})
    damage(body)
    response = post_fhir(client, "/fhir", body)
    assert response.status_code == 422, response.text
    [issue, *_] = OperationOutcome.model_validate(response.json()).issue
    assert (issue.expression or [""])[0].startswith(element)


def test_an_if_none_exist_with_a_lone_surrogate_is_a_422_naming_the_element(client: TestClient) -> None:
    """`\\ud800` decodes to a text PostgreSQL cannot take: the conditional create's search was a 500."""
    body = order({"system": "urn:hospital-a:order", "value": "SUR-1"})
    body["entry"][1]["request"]["ifNoneExist"] = "identifier=urn:hospital-a:order|SUR-\ud800"
    raw = json.dumps(body).encode()  # the lone surrogate escaped as \\ud800 (ensure_ascii)
    response = client.post("/fhir", content=raw, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 422, response.text
    [issue] = OperationOutcome.model_validate(response.json()).issue
    assert issue.expression == ["Bundle.entry[1].request.ifNoneExist"] and "SUR-" not in response.text


def test_json_nested_too_deep_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/fhir", content="[" * 5000 + "]" * 5000, headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_resources_are_validated_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validating a 28 MB Bundle took 5 s on the event loop: every other request to intake waited that long."""
    where: list[bool] = []
    for name in ("from_bundle", "from_service_request"):
        real = getattr(fhir_intake, name)

        def spy(document: Any, real: Any = real) -> Any:
            where.append(on_event_loop())
            return real(document)

        monkeypatch.setattr(fhir_intake, name, spy)
    assert post_fhir(client, "/fhir", order({"value": "LOOP-1"})).status_code == 200
    assert post_fhir(client, "/fhir/ServiceRequest", contained_request("LOOP-2")).status_code == 201
    assert where == [False, False]


@pytest.mark.parametrize("path", ["/fhir", "/fhir/ServiceRequest"])
def test_a_number_of_thousands_of_digits_is_a_400_saying_so(client: TestClient, path: str) -> None:
    """json.loads refuses an integer of more than 4300 digits with a ValueError that was not caught: a 500."""
    body = b'{"resourceType": "Bundle", "n": ' + b"9" * 5000 + b"}"
    response = client.post(path, content=body, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400, response.text
    [issue] = OperationOutcome.model_validate(response.json()).issue
    assert "a number with more digits than can be read" in (issue.diagnostics or "")


@pytest.mark.parametrize(
    ("send", "status"),
    [
        (lambda c: c.post("/fhir", json=FULL, headers={"Authorization": "Bearer not-a-key"}), 401),
        (lambda c: c.get("/fhir/Task/x", headers={"Authorization": ""}), 401),
        (lambda c: c.post("/fhir", json=FULL, headers={"Idempotency-Key": "k" * 300}), 422),
        (lambda c: c.put("/fhir/Task/x", json={}), 405),
        (lambda c: c.get("/fhir/NoSuchType/1"), 404),
    ],
    ids=["bad key", "no key", "idempotency key too long", "method not allowed", "unknown path"],
)
def test_every_error_under_fhir_is_an_operation_outcome(client: TestClient, send: Any, status: int) -> None:
    response = send(client)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert OperationOutcome.model_validate(response.json()).issue[0].severity == "error"


def test_errors_outside_fhir_are_problem_details(client: TestClient) -> None:
    response = client.get("/v1/cases/no-such-case")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"  # RFC 9457
    assert response.json()["status"] == 404


@pytest.mark.parametrize(
    ("send", "status"),
    [
        (lambda c: c.get("/fhir/metadata", params={"_format": "xml"}), 406),
        (lambda c: c.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"}), 406),
        (lambda c: c.get("/fhir/Task/x", headers={"Accept": "application/fhir+xml"}), 406),
        (
            lambda c: c.post("/fhir", content=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml"}),
            415,
        ),
        (lambda c: c.post("/fhir/ServiceRequest", data={"a": "b"}), 415),
    ],
    ids=["_format=xml", "Accept xml", "Accept xml on a read", "an XML body", "a form body"],
)
def test_only_json_is_spoken_and_the_answer_says_so(client: TestClient, send: Any, status: int) -> None:
    response = send(client)
    assert response.status_code == status, response.text
    issue = OperationOutcome.model_validate(response.json()).issue[0]
    assert "JSON" in issue.diagnostics


def test_json_in_any_of_its_names_is_served(client: TestClient) -> None:
    for accept in ("application/fhir+json", "application/json", "*/*", "application/fhir+xml, */*;q=0.1"):
        assert client.get("/fhir/metadata", headers={"Accept": accept}).status_code == 200, accept
    assert client.get("/fhir/metadata", params={"_format": "application/fhir+json"}).status_code == 200


def contained_request(reference: str) -> dict[str, Any]:
    return dict(
        SERVICE_REQUEST,
        identifier=[{"system": "urn:hospital-a:order", "value": reference}],
        subject={"reference": "#pat"},
        contained=[
            PATIENT,
            {k: v for k, v in STUDY.items() if k != "endpoint"} | {"subject": {"reference": "#pat"}},
        ],
    )


def test_a_conditional_create_answers_the_case_that_exists_instead_of_making_one(
    client: TestClient, engine: Engine
) -> None:
    condition = {
        "If-None-Exist": "identifier=urn:hospital-a:order|COND-1",
        "Content-Type": "application/fhir+json",
    }
    first = client.post("/fhir/ServiceRequest", json=contained_request("COND-1"), headers=condition)
    assert first.status_code == 201, first.text  # none existed: created
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    again = client.post("/fhir/ServiceRequest", json=contained_request("COND-1"), headers=condition)
    assert again.status_code == 200, again.text  # FHIR conditional create: one match is answered, not made
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"].endswith(f"/fhir/ServiceRequest/{first.json()['id']}/_history/1")
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before

    in_a_bundle = order({"system": "urn:hospital-a:order", "value": "COND-1"})
    in_a_bundle["entry"][1]["request"] = {
        "method": "POST",
        "url": "ServiceRequest",
        "ifNoneExist": "identifier=urn:hospital-a:order|COND-1",
    }
    answered = post_fhir(client, "/fhir", in_a_bundle)
    assert answered.status_code == 200, answered.text
    [entry] = [e for e in answered.json()["entry"] if "resource" in e]
    assert entry["response"]["status"] == "200 OK" and entry["resource"]["id"] == first.json()["id"]


def test_a_conditional_create_on_something_else_than_identifier_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/fhir/ServiceRequest",
        json=contained_request("COND-2"),
        headers={"If-None-Exist": "patient.name=Doe", "Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 400
    issue = OperationOutcome.model_validate(response.json()).issue[0]
    assert issue.expression == ["If-None-Exist"] and "Doe" not in response.text


def test_a_conditional_create_reads_the_identifier_as_fhir_token_search(client: TestClient) -> None:
    """`system|value` exactly, `|value` only the reference sent without a system, `value` under any system:
    one match is answered, two are a 412 (FHIR conditional create), none creates."""

    def post(identifier: dict[str, str], condition: str) -> Any:
        request = contained_request(identifier["value"]) | {"identifier": [identifier]}
        return client.post(
            "/fhir/ServiceRequest",
            json=request,
            headers={"If-None-Exist": condition, "Content-Type": "application/fhir+json"},
        )

    a = post({"system": "urn:hospital-a:order", "value": "TOK-1"}, "identifier=urn:hospital-a:order|TOK-1")
    b = post({"system": "urn:hospital-b:order", "value": "TOK-1"}, "identifier=urn:hospital-b:order|TOK-1")
    bare = post({"value": "TOK-1"}, "identifier=%7CTOK-1")  # "|TOK-1": none without a system yet
    assert (a.status_code, b.status_code, bare.status_code) == (201, 201, 201), (a.text, b.text, bare.text)
    assert len({a.json()["id"], b.json()["id"], bare.json()["id"]}) == 3

    found = post(
        {"system": "urn:hospital-b:order", "value": "TOK-1"}, "identifier=urn:hospital-b:order|TOK-1"
    )
    assert (found.status_code, found.json()["id"]) == (200, b.json()["id"])
    found = post({"value": "TOK-1"}, "identifier=|TOK-1")
    assert (found.status_code, found.json()["id"]) == (200, bare.json()["id"])

    several = post({"value": "TOK-1"}, "identifier=TOK-1")  # under any system: three cases
    assert several.status_code == 412, several.text
    issue = OperationOutcome.model_validate(several.json()).issue[0]
    assert issue.code == "multiple-matches" and "identifier=system|value" in issue.diagnostics

    only = post({"system": "urn:hospital-c:order", "value": "TOK-2"}, "identifier=urn:hospital-c:order|TOK-2")
    again = post({"system": "urn:hospital-c:order", "value": "TOK-2"}, "identifier=TOK-2")  # one, any system
    assert (again.status_code, again.json()["id"]) == (200, only.json()["id"])
    assert post({"value": "TOK-2"}, "identifier=|TOK-2").status_code == 201  # none without a system


@pytest.mark.parametrize(
    ("damage", "where"),
    [
        (
            lambda b: b["entry"][1]["resource"].update(
                identifier=[{"system": "Jane Doe orders", "value": "S-1"}]
            ),
            "Bundle.entry[1].resource.identifier[0].system",
        ),
        (
            lambda b: b["entry"][0]["resource"].update(identifier=[{"system": "MRN", "value": "S-2"}]),
            "Bundle.entry[0].resource.identifier[0].system",
        ),
        (
            lambda b: b["entry"][1]["resource"]["requester"]["identifier"].update(system="npi\u0000"),
            "Bundle.entry[1].resource.requester.identifier.system",
        ),
        (
            lambda b: b["entry"][1]["resource"].update(requisition={"system": "", "value": "S-3"}),
            "Bundle.entry[1].resource.requisition.system",
        ),
        (
            lambda b: b["entry"][0]["resource"].update(
                contained=[{"resourceType": "Patient", "identifier": [{"system": "urn:a b", "value": "S-4"}]}]
            ),
            "Bundle.entry[0].resource.contained[0].identifier[0].system",
        ),
    ],
    ids=["order", "patient MRN", "requester (NUL)", "requisition (empty)", "contained resource"],
)
def test_an_identifier_system_that_is_not_a_uri_is_a_422_naming_the_element_without_echo(
    client: TestClient, engine: Engine, damage: Any, where: str
) -> None:
    body = order({"system": "urn:hospital-a:order", "value": "SYS-1"})
    damage(body)
    with Session(engine) as session:
        before = len(session.exec(select(Case)).all())
    response = post_fhir(client, "/fhir", body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    [issue] = OperationOutcome.model_validate(response.json()).issue
    # A NUL is refused as the body arrives, before the element is read as a URI.
    refused_for = "NUL character" if "\\u0000" in json.dumps(body) else "absolute URI"
    assert issue.expression == [where] and refused_for in (issue.diagnostics or "")
    assert not any(echo in response.text for echo in ("Jane Doe", "MRN", "npi", "urn:a b", "S-"))
    with Session(engine) as session:
        assert len(session.exec(select(Case)).all()) == before


@pytest.mark.parametrize(
    "condition",
    [
        "identifier=Jane%20Doe%7CCOND-9",
        "identifier=urn:a%7C",
        "identifier=urn:a%7CCOND-9%5C",
        "identifier=urn:a%7CCOND%009",
    ],
    ids=["system not a URI", "no value", "lone backslash", "NUL in the value"],
)
def test_a_conditional_create_with_a_bad_identifier_is_a_400_without_echo(
    client: TestClient, condition: str
) -> None:
    response = client.post(
        "/fhir/ServiceRequest",
        json=contained_request("COND-9"),
        headers={"If-None-Exist": condition, "Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 400, response.text
    issue = OperationOutcome.model_validate(response.json()).issue[0]
    assert issue.expression == ["If-None-Exist"] and "Jane" not in response.text


def test_an_order_number_with_a_nul_is_a_422_not_a_500(client: TestClient) -> None:
    """PostgreSQL stores no NUL: refused as invalid, under /fhir and on the JSON API."""
    response = post_fhir(client, "/fhir", order({"system": "urn:hospital-a:order", "value": "NUL\x00-1"}))
    assert response.status_code == 422, response.text
    [issue] = OperationOutcome.model_validate(response.json()).issue
    assert (
        issue.expression == ["Bundle.entry[1].resource.identifier[0].value"] and "NUL-" not in response.text
    )
    assert "NUL character" in (issue.diagnostics or "")
    body = dict(SAMPLE, partner_case_ref="NUL\x00-2", partner_case_ref_system="urn:hospital-a:order")
    response = client.post("/v1/cases", json=body)
    assert (response.status_code, response.headers["content-type"]) == (422, "application/problem+json")
    assert [e["field"] for e in response.json()["errors"]] == ["partner_case_ref"]


def test_a_nul_in_a_bundle_sent_without_a_content_type_is_a_422_not_a_case(client: TestClient) -> None:
    """The Bundle is read as JSON without a Content-Type, but the guard only read bodies declared JSON: the
    patient's name with a NUL made a case, sent on to every service past the guard meant to keep it out."""
    body = order({"system": "urn:hospital-a:order", "value": "NUL-CT-1"})
    body["entry"][0]["resource"]["name"] = [{"family": "Doe\u0000", "given": ["Jane"]}]
    response = client.post("/fhir", content=json.dumps(body).encode())
    assert response.status_code == 422, response.text
    [issue] = OperationOutcome.model_validate(response.json()).issue
    assert issue.expression == ["Bundle.entry[0].resource.name[0].family"] and "Jane" not in response.text


def test_an_order_identifier_without_a_value_is_still_no_reference(client: TestClient) -> None:
    created = post_fhir(client, "/fhir", order({"system": "urn:hospital-a:order"}))
    assert created.status_code == 200, created.text
    assert "identifier" not in case_task(created)
    assert "groupIdentifier" not in client.get(f"/fhir/Task/{case_task(created)['id']}").json()
