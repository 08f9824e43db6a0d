"""The request examples of the FHIR routes' OpenAPI document: the request of docs/partners.md, as a partner
sends it to `POST /fhir` (a transaction Bundle) and to `POST /fhir/ServiceRequest` (resources contained).
A unit test reads each with the route's own reader, so an example the route would refuse cannot ship."""

from __future__ import annotations

from typing import Any

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat",
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.2", "value": "MRN-0042"}],
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "gender": "female",
    "birthDate": "1984-03-02",
    "address": [{"state": "CA"}],
    "managingOrganization": {"display": "Bayview Women's Clinic"},
}
SERVICE_REQUEST: dict[str, Any] = {
    "resourceType": "ServiceRequest",
    "status": "active",
    "intent": "order",
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.1", "value": "REF-1002"}],
    "subject": {"reference": "Patient/pat"},
    "requester": {
        "display": "Dr. Alex Kim",
        "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
    },
    "reasonCode": [{"coding": [{"system": "urn:secondopinion:reason", "code": "possible_malignancy"}]}],
    "note": [{"text": "Complex adnexal mass: benign or suspicious?"}],
}
COVERAGE: dict[str, Any] = {
    "resourceType": "Coverage",
    "status": "active",
    "subscriberId": "W123456789",
    "beneficiary": {"reference": "Patient/pat"},
    "payor": [{"display": "Acme Health"}],
    "class": [{"type": {"coding": [{"code": "plan"}]}, "value": "ACME-PPO"}],
}
CONSENT: dict[str, Any] = {
    "resourceType": "Consent",
    "status": "active",
    "patient": {"reference": "Patient/pat"},
    "scope": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
        ]
    },
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
}
IMAGING_STUDY: dict[str, Any] = {
    "resourceType": "ImagingStudy",
    "status": "available",
    "subject": {"reference": "Patient/pat"},
    "started": "2026-11-20T10:00:00Z",
    "procedureCode": [{"text": "pelvic"}],
    "location": {"display": "Bayview Imaging"},
    "endpoint": [{"reference": "Endpoint/pacs"}],
}
ENDPOINT: dict[str, Any] = {
    "resourceType": "Endpoint",
    "id": "pacs",
    "status": "active",
    "address": "https://pacs.bayview.example/dicomweb",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "payloadType": [{"text": "DICOM"}],
}

BUNDLE_EXAMPLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {"request": {"method": "POST", "url": r["resourceType"]}, "resource": r}
        for r in (PATIENT, SERVICE_REQUEST, COVERAGE, CONSENT, IMAGING_STUDY, ENDPOINT)
    ],
}


def _local(resource: dict[str, Any], **references: Any) -> dict[str, Any]:
    """`resource` with its references to the others pointed at the contained copies (`#pat`, `#pacs`)."""
    return {**resource, **references}


SERVICE_REQUEST_EXAMPLE: dict[str, Any] = {
    **SERVICE_REQUEST,
    "subject": {"reference": "#pat"},
    "contained": [
        PATIENT,
        _local(COVERAGE, beneficiary={"reference": "#pat"}),
        _local(CONSENT, patient={"reference": "#pat"}),
        _local(IMAGING_STUDY, subject={"reference": "#pat"}, endpoint=[{"reference": "#pacs"}]),
        ENDPOINT,
    ],
}
