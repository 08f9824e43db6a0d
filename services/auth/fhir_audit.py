"""The audit log as FHIR R4 AuditEvent resources in a `searchset` Bundle (fhir.resources R4B models)."""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle

from services.auth.models import AuditEvent

ACTIONS = {"create": "C", "read": "R", "list": "R", "get": "R", "update": "U", "post": "C", "delete": "D"}
INTERACTIONS = {
    "create": "create",
    "read": "read",
    "get": "read",
    "list": "search-type",
    "update": "update",
    "delete": "delete",
}
OUTCOMES = {"success": "0", "denied": "4", "failed": "8"}
CASE_SYSTEM = "urn:secondopinion:case"
ACTOR_SYSTEM = "urn:secondopinion:api-key"
# What a DICOMweb read names (services.auth.access.dicom_detail): its study, as IHE ATNA's "DICOM Instances
# Accessed" names the study (DCM 110180) with the series and instance read.
DICOM_READ = re.compile(r"study ([0-9.]+)(?: series ([0-9.]+))?(?: instance ([0-9.]+))?")
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _study_entity(detail: str) -> dict[str, Any] | None:
    found = DICOM_READ.match(detail)
    if found is None:
        return None
    study, series, instance = found.groups()
    parts = [("Series Instance UID", series), ("SOP Instance UID", instance)]
    return {
        "what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}},
        "type": {"system": DCM, "code": "110180", "display": "Study Instance UID"},
        "role": {
            "system": "http://terminology.hl7.org/CodeSystem/object-role",
            "code": "3",
            "display": "Report",
        },
        "detail": [{"type": name, "valueString": uid} for name, uid in parts if uid],
    }


def to_fhir(entry: AuditEvent) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(entry.id),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction",
                "code": INTERACTIONS.get(entry.action, "read"),
            }
        ],
        "action": ACTIONS.get(entry.action, "E"),
        "recorded": entry.at.isoformat(),
        "outcome": OUTCOMES.get(entry.outcome, "8"),
        "outcomeDesc": entry.detail or entry.outcome,
        "purposeOfEvent": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": entry.purpose}
                ]
            }
        ],
        "agent": [
            {
                "who": {"identifier": {"system": ACTOR_SYSTEM, "value": entry.actor}},
                "requestor": True,
                **({"altId": entry.partner_id} if entry.partner_id else {}),
                **({"role": [{"text": entry.role}]} if entry.role else {}),
            }
        ],
        "source": {"observer": {"display": f"secondopinion {entry.service}"}},
        "entity": [{"name": entry.resource}],
    }
    if entry.case_id:
        resource["entity"][0]["what"] = {"identifier": {"system": CASE_SYSTEM, "value": entry.case_id}}
    study = _study_entity(entry.detail) if entry.resource.startswith("records.dicomweb") else None
    if study is not None:
        resource["entity"].append(study)
    return FhirAuditEvent.model_validate(resource).model_dump(mode="json", exclude_none=True)


def bundle(entries: list[AuditEvent], total: int, links: dict[str, str]) -> dict[str, Any]:
    """A page of the export: `total` counts every page's entries, `links` (relation: absolute URL) are self
    and, when more follow, next (FHIR R4 http.html#paging)."""
    document = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": relation, "url": url} for relation, url in links.items()],
        "entry": [{"resource": to_fhir(e), "search": {"mode": "match"}} for e in entries],
    }
    return Bundle.model_validate(document).model_dump(mode="json", exclude_none=True)
