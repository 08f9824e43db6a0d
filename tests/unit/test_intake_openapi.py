"""The intake OpenAPI document is complete: every operation documents its success and its errors, with
schemas and examples, so a partner can integrate from the document alone."""

from typing import Any

import pytest

from services.intake import fhir_intake
from services.intake.main import app

OPS = {"/healthz", "/readyz", "/metrics"}
DOCUMENT: dict[str, Any] = app.openapi()
OPERATIONS = [
    (path, method, op)
    for path, methods in DOCUMENT["paths"].items()
    if path not in OPS
    for method, op in methods.items()
]


def test_every_route_of_the_issue_is_documented() -> None:
    paths = set(DOCUMENT["paths"])
    for path in (
        "/v1/cases",
        "/v1/cases/{case_id}",
        "/v1/cases/{case_id}/cancel",
        "/v1/cases/{case_id}/documents",
        "/v1/cases/{case_id}/questions",
        "/fhir",
        "/fhir/ServiceRequest",
        "/fhir/Task/{task_id}",
        "/webhooks/partners/{partner_id}",
        "/v1/partners",
        "/v1/partners/{partner_id}/audit-events",
        "/v1/partners/{partner_id}/webhook-endpoints",
        "/auth/token",
        "/fhir/.well-known/smart-configuration",
        "/v1/partners/{partner_id}/smart-clients",
    ):
        assert path in paths


@pytest.mark.parametrize(
    ("path", "method", "op"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m, _ in OPERATIONS]
)
def test_operation_documents_success_and_errors_with_examples(
    path: str, method: str, op: dict[str, Any]
) -> None:
    codes = set(op["responses"])
    assert any(c.startswith("2") for c in codes), "no success response"
    errors = [c for c in codes if c.startswith("4")]
    assert errors, "no error response"
    # Signed, public by FHIR, or SMART discovery and its token endpoint (the signed assertion authenticates).
    if path not in ("/webhooks/partners/{partner_id}", "/fhir/metadata", "/fhir/.well-known/smart-configuration",
                    "/auth/token"):  # fmt: skip
        assert "401" in codes, "authenticated routes document 401"
    for code in errors:
        content = op["responses"][code].get("content", {})
        assert content, f"{code} has no body shape"
        for media in content.values():
            assert "schema" in media and "example" in media, f"{code} lacks a schema or an example"
    if "requestBody" in op:
        body = next(iter(op["requestBody"]["content"].values()))
        schema = body.get("schema", {})
        ref = schema.get("$ref", "").rsplit("/", 1)[-1]
        resolved = DOCUMENT["components"]["schemas"].get(ref, schema)
        assert "example" in body or "examples" in resolved or "examples" in schema, (
            "request body has no example"
        )


@pytest.mark.parametrize(
    ("path", "read"),
    [("/fhir", fhir_intake.from_bundle), ("/fhir/ServiceRequest", fhir_intake.from_service_request)],
)
def test_each_fhir_request_example_is_a_request_the_route_takes(path: str, read: Any) -> None:
    body = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/fhir+json"]
    case = read(body["example"]).case  # raises FhirInvalid, naming the element, for an example it refuses
    assert case.partner_case_ref and case.patient.family_name
