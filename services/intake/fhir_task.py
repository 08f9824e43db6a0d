"""A case as a FHIR R4 Task whose status follows the case (no PHI: ids, status and report links only), versioned
by what it shows (meta.versionId, the ETag) so a partner polling it is answered 304 while nothing changed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fhir.resources.R4B.task import Task

from services.intake.handlers import reference_system
from services.intake.models import Case

CASE_SYSTEM = "urn:secondopinion:case"

TASK_STATUS = {
    "intake": "received",
    "awaiting_consent": "on-hold",
    "identity_mismatch": "on-hold",
    "awaiting_patient_decision": "on-hold",
    "on_hold": "on-hold",
    "awaiting_records": "accepted",
    "awaiting_acceptance": "accepted",
    "follow_up": "completed",
    "awaiting_insurance": "accepted",
    "matching": "accepted",
    "unmatched": "on-hold",
    "in_review": "in-progress",
    "awaiting_communication": "on-hold",  # the report waits for operations to document who was told
    "composing_report": "in-progress",
    "delivering": "in-progress",
    "delivered": "completed",
    "closed": "completed",
    "cancelled": "cancelled",
}


def task_status(case_status: str) -> str:
    return TASK_STATUS.get(case_status, "in-progress")


def order_identifier(case: Case) -> dict[str, str]:
    """The partner's order as it was sent (ServiceRequest.identifier); one sent without a system (or stored
    before systems were kept) is named in the partner's own namespace, as it always was."""
    return {
        "system": reference_system(case) or f"urn:secondopinion:partner:{case.partner_id}",
        "value": str(case.partner_case_ref),
    }


def to_task(case: Case) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": case.id,
        "identifier": [{"system": CASE_SYSTEM, "value": case.id}],
        "status": task_status(case.status),
        "businessStatus": {"coding": [{"system": "urn:secondopinion:case-status", "code": case.status}]},
        "intent": "order",
        # The order this Task fulfils (services.intake.fhir_service_request: the same id).
        "focus": {"reference": f"ServiceRequest/{case.id}"},
        "basedOn": [{"reference": f"ServiceRequest/{case.id}"}],
        "priority": {"standard": "routine", "priority": "urgent", "urgent": "asap"}.get(
            case.urgency, "routine"
        ),
        "code": {"text": "second opinion on a diagnostic ultrasound"},
        "authoredOn": case.created_at.isoformat(),
        "lastModified": case.updated_at.isoformat(),
        "restriction": {"period": {"end": case.due_at.isoformat()}},
    }
    if case.partner_case_ref:
        resource["groupIdentifier"] = order_identifier(case)
    if case.delivered_at and case.report_pdf_url and case.report_fhir_url:
        resource["output"] = [
            {"type": {"text": "report (PDF)"}, "valueUrl": case.report_pdf_url},
            {"type": {"text": "report (FHIR DiagnosticReport)"}, "valueUrl": case.report_fhir_url},
        ]
    task = Task.model_validate(resource).model_dump(mode="json", exclude_none=True)
    return {**task, "meta": {"versionId": version_of(task), "lastUpdated": case.updated_at.isoformat()}}


def version_of(task: dict[str, Any]) -> str:
    """The Task's version: a digest of what it shows, so it changes whenever the case changes anything the
    Task shows (its status, its due date moved by the workflow, the report delivered), and only then."""
    shown = {k: v for k, v in task.items() if k != "meta"}
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:16]
