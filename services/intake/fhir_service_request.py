"""The partner's order as a FHIR R4 ServiceRequest, as intake keeps it: what was read from the order (the case's
request), under the case's id, so `ServiceRequest/{id}` and `Task/{id}` are the order and its fulfilment.

It is kept as received and never changes (version 1, lastUpdated its creation): the order is the partner's, its
progress is the Task's (`Task.focus` and `Task.basedOn` reference it). It carries the order's identifier,
priority, reason and requester; not the patient's identity nor the clinical question (the subject is named as
the case's patient, as insurance's Coverage names its beneficiary): a create's answer and a transaction-response
carry no PHI, as they did when they carried the Task. Reads are audited and partner-scoped all the same."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.servicerequest import ServiceRequest

from services.common.config import Settings
from services.intake.fhir_intake import NPI_SYSTEM
from services.intake.fhir_task import order_identifier
from services.intake.models import Case, CaseCreate

VERSION = "1"
CPT = "http://www.ama-assn.org/go/cpt"
REASON_SYSTEM = "urn:secondopinion:reason"
PRIORITY = {"standard": "routine", "priority": "urgent", "urgent": "asap"}


def to_service_request(case: Case) -> dict[str, Any]:
    request = CaseCreate.model_validate_json(case.request_json)
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": case.id,
        "meta": {"versionId": VERSION, "lastUpdated": case.created_at.isoformat()},
        "status": "active",
        "intent": "order",
        "priority": PRIORITY.get(case.urgency, "routine"),
        "code": {
            "coding": [
                {
                    "system": CPT,
                    "code": "76140",
                    "display": "Consultation on X-ray examination made elsewhere, written report",
                }
            ],
            "text": "second opinion on a diagnostic ultrasound",
        },  # fmt: skip
        "subject": {"type": "Patient", "display": f"patient of case {case.id}"},
        "authoredOn": case.created_at.isoformat(),
        "requester": {
            "type": "Practitioner",
            "display": request.referring.name,
            "identifier": {"system": NPI_SYSTEM, "value": request.referring.npi},
        },
        "reasonCode": [{"coding": [{"system": REASON_SYSTEM, "code": str(request.reason)}]}],
    }
    if case.partner_case_ref:
        resource["identifier"] = [order_identifier(case)]
    return ServiceRequest.model_validate(resource).model_dump(mode="json", exclude_none=True)  # type: ignore[no-any-return]


def history_location(base: str, case_id: str) -> str:
    """Where a create says the version it made is (FHIR R4 http.html#create): [base]/ServiceRequest/{id}/_history/1."""
    return f"{base}/ServiceRequest/{case_id}/_history/{VERSION}"


def fhir_base(settings: Settings) -> str:
    """Our public FHIR base (INTAKE_URL), never one built from the request's Host header, which a client sets
    as it likes (a Location pointing elsewhere)."""
    return f"{settings.intake_url.rstrip('/')}/fhir"
