"""The specialist directory for operations: CRUD with clear 4xx, FHIR Practitioner / PractitionerRole."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient
from fhir.resources.R4B.practitioner import Practitioner
from fhir.resources.R4B.practitionerrole import PractitionerRole
from sqlalchemy.engine import Engine

from services.common.config import Settings
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import (
    apply,
    match_command,
    outbox_event,
)

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


def new_specialist(**update: Any) -> dict[str, Any]:
    return {
        "id": f"spec-msk-{uuid.uuid4().hex[:6]}",
        "display_name": "Tomas Ortega",
        "credentials": "MD, MSK",
        "npi": "1316947523",
        "subspecialties": ["musculoskeletal"],
        "licensed_states": ["HI"],
        "organization": "Island Orthopaedic Imaging",
        "academic": True,
        "max_open_reviews": 3,
        "payer_networks": ["ACME-PPO"],
        "out_of_office": [{"start": "2030-01-02", "end": "2030-01-09"}],
        **update,
    }


def test_operations_add_read_update_and_deactivate_a_specialist(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    body = new_specialist()
    sid = body["id"]

    created = client.post("/v1/specialists", json=body)
    duplicate = client.post("/v1/specialists", json=body)
    matched = match_command("musculoskeletal", "HI")
    apply(engine, settings, matched)
    update_body = {k: v for k, v in body.items() if k != "id"} | {"licensed_states": ["HI", "AK"]}
    updated = client.put(f"/v1/specialists/{sid}", json=update_body)
    deactivated = client.delete(f"/v1/specialists/{sid}")
    unmatched = match_command("musculoskeletal", "HI")
    apply(engine, settings, unmatched)

    assert created.status_code == 201, created.text
    assert duplicate.status_code == 409
    assert outbox_event(engine, f"{matched.id}>review.offered").data["reviewer_id"] == sid
    assert updated.status_code == 200
    assert client.get(f"/v1/specialists/{sid}").json()["licensed_states"] == ["HI", "AK"]
    assert deactivated.json()["active"] is False
    assert "is licensed in HI" in outbox_event(engine, f"{unmatched.id}>review.unmatched").data["reason"]
    assert client.get("/v1/specialists/spec-none").status_code == 404


def test_bad_directory_entries_name_the_fields(client: TestClient) -> None:
    response = client.post(
        "/v1/specialists",
        json=new_specialist(
            npi="12345",
            subspecialties=["astrology"],
            licensed_states=["California"],
            out_of_office=[{"start": "2030-01-09", "end": "2030-01-02"}],
            extra="x",
        ),
    )

    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"npi", "subspecialties.0", "licensed_states.0", "out_of_office.0", "extra"}
    assert "California" not in response.text


def test_directory_as_fhir_practitioner_and_role(client: TestClient) -> None:
    practitioner = client.get("/fhir/Practitioner/spec-gyn-1")
    role = client.get("/fhir/PractitionerRole/spec-gyn-1")
    missing = client.get("/fhir/Practitioner/spec-none")

    assert practitioner.headers["content-type"].startswith("application/fhir+json")
    p = Practitioner.model_validate(practitioner.json())
    assert p.identifier[0].value == "1234567810"
    assert {q.code.text for q in p.qualification} >= {"Medical licence, CA"}
    r = PractitionerRole.model_validate(role.json())
    assert r.practitioner.reference == "Practitioner/spec-gyn-1"
    assert [s.coding[0].code for s in r.specialty] == ["gynecologic_imaging", "body_imaging"]
    assert r.organization.display == "Pacific University Medical Center"
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
