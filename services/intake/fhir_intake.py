"""FHIR R4 in: a transaction Bundle (or a ServiceRequest with contained resources) becomes a CaseCreate.

Each resource is validated with the `fhir.resources` R4B models first; then the case is read from them:

- Patient: name, birthDate, gender, identifier (MRN), address[0].state, managingOrganization (referrer's org)
- ServiceRequest: status `active` and an intent of request-intent (required bindings, which the R4B models do not
  check), identifier[0] (the partner's case reference: value and system), requester (display and
  NPI identifier), reasonCode (a `contracts.triage.Reason` code), note[0] (the clinical question)
- Coverage: subscriberId (member id), class of type `plan` (plan code); absent means self-pay
- Consent (active) or a DocumentReference typed LOINC 59284-0: the records-release authorization
- DocumentReference: the original report, kept as a case document
- ImagingStudy: started (exam date), procedureCode (exam type), location (facility), identifier (study UID)
- Observation LOINC 49051-6 (gestational age, valueQuantity in weeks) for obstetric and fetal cases
- Procedure with status `preparation`: performedDateTime is the planned invasive procedure's date

Every Identifier.system, in any resource, must be an absolute URI (the R4B models take any string).
A problem is a `FhirInvalid` naming the element as a FHIRPath, e.g. `Bundle.entry[0].resource.birthDate`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.identifier import Identifier
from pydantic import BaseModel, ValidationError

from services.intake.models import CaseCreate, DocumentCreate, DocumentKind
from services.intake.order_reference import SYSTEM_RULE, is_identifier_system

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
CONSENT_LOINC = "59284-0"
GESTATIONAL_AGE_LOINC = "49051-6"
SUPPORTED = {
    "Patient",
    "ServiceRequest",
    "Coverage",
    "Consent",
    "DocumentReference",
    "ImagingStudy",
    "Endpoint",
    "Observation",
    "Procedure",
}

# Required bindings of the ServiceRequest's codes (FHIR R4 valueset-request-status, -request-intent): the R4B
# models take any code. Only an active order opens a case.
REQUEST_STATUSES = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
REQUEST_INTENTS = {"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order",
                   "instance-order", "option"}  # fmt: skip

# Where each CaseCreate field comes from, to name the FHIR element when the value is refused.
SOURCES = {
    "patient.family_name": "Patient.name[0].family",
    "patient.given_name": "Patient.name[0].given[0]",
    "patient.birth_date": "Patient.birthDate",
    "patient.sex": "Patient.gender",
    "patient.mrn": "Patient.identifier[0].value",
    "patient.state": "Patient.address[0].state",
    "referring.name": "ServiceRequest.requester.display",
    "referring.npi": "ServiceRequest.requester.identifier.value",
    "referring.organization": "Patient.managingOrganization.display",
    "exam.exam_type": "ImagingStudy.procedureCode[0]",
    "exam.performed_on": "ImagingStudy.started",
    "exam.facility": "ImagingStudy.location.display",
    "exam.study_instance_uid": "ImagingStudy.identifier",
    "clinical_question": "ServiceRequest.note[0].text",
    "reason": "ServiceRequest.reasonCode[0].coding[0].code",
    "partner_case_ref": "ServiceRequest.identifier[0].value",
    "partner_case_ref_system": "ServiceRequest.identifier[0].system",
    "coverage.member_id": "Coverage.subscriberId",
    "coverage.plan_code": "Coverage.class",
    "gestational_age_weeks": "Observation.valueQuantity.value",
    "procedure_scheduled_on": "Procedure.performedDateTime",
}


@dataclass
class Issue:
    expression: str
    diagnostics: str


class FhirInvalid(Exception):
    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("; ".join(f"{i.expression}: {i.diagnostics}" for i in issues))
        self.issues = issues


@dataclass
class FhirRequest:
    case: CaseCreate
    documents: list[DocumentCreate] = field(default_factory=list)
    imaging_endpoint: str | None = None


def validated(resource: Any, path: str) -> dict[str, Any]:
    """The resource as a dict once the R4B model accepts it; otherwise FhirInvalid naming each element."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise FhirInvalid([Issue(path, "not a FHIR resource (no resourceType)")])
    kind = resource["resourceType"]
    if kind not in SUPPORTED:
        accepted = ", ".join(sorted(SUPPORTED))  # the type sent is not echoed: it may be any text
        raise FhirInvalid(
            [Issue(f"{path}.resourceType", f"this resourceType is not accepted here; send {accepted}")]
        )
    try:
        model = get_fhir_model_class(kind).model_validate(resource)
    except ValidationError as exc:
        raise FhirInvalid(
            [Issue(".".join([path, *_loc(e["loc"])]).replace(".[", "["), e["msg"]) for e in exc.errors()[:20]]
        ) from exc
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        # fhir.resources raises these, not a ValidationError, for an unknown or non-string resourceType in
        # `contained` and for deeply nested elements.
        raise FhirInvalid(
            [Issue(path, "not a valid FHIR R4 resource (unknown type or nested too deep)")]
        ) from exc
    try:
        unsystematic = [
            Issue(f"{where}.system", SYSTEM_RULE)
            for where, identifier in identifiers(model, path)
            if identifier.system is not None and not is_identifier_system(identifier.system)
        ]
    except RecursionError as exc:
        raise FhirInvalid([Issue(path, "not a valid FHIR R4 resource (nested too deep)")]) from exc
    if unsystematic:
        raise FhirInvalid(unsystematic[:20])
    return resource


def identifiers(element: Any, path: str) -> Iterator[tuple[str, Identifier]]:
    """Every Identifier in a validated resource, wherever it sits (identifier, requisition, a Reference's,
    an extension's valueIdentifier, a contained resource's), with its FHIRPath."""
    if isinstance(element, Identifier):
        yield path, element
    if isinstance(element, BaseModel):
        for name, info in type(element).model_fields.items():
            value = getattr(element, name, None)
            if value is not None:
                yield from identifiers(value, f"{path}.{info.alias or name}")
    elif isinstance(element, list):
        for i, item in enumerate(element):
            yield from identifiers(item, f"{path}[{i}]")


def _loc(loc: tuple[Any, ...]) -> list[str]:
    return [f"[{p}]" if isinstance(p, int) else str(p) for p in loc]


def from_bundle(bundle: Any) -> FhirRequest:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirInvalid([Issue("Bundle", "POST /fhir takes a Bundle of type transaction")])
    if bundle.get("type") != "transaction":
        raise FhirInvalid([Issue("Bundle.type", "must be transaction")])
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise FhirInvalid([Issue("Bundle.entry", "the Bundle has no entries")])
    resources: dict[str, list[dict[str, Any]]] = {}
    for i, entry in enumerate(entries):
        path = f"Bundle.entry[{i}].resource"
        resource = validated(entry.get("resource") if isinstance(entry, dict) else None, path)
        resources.setdefault(resource["resourceType"], []).append(resource)
        _entry_request(entry, f"Bundle.entry[{i}].request", resource["resourceType"])
    return read_case(resources)


def _entry_request(entry: dict[str, Any], path: str, kind: str) -> None:
    """An entry's request asks to store what it carries: POST (PUT too, but not for the order, which is only
    created); `ifNoneExist` is read for a conditional create. A GET, DELETE, PATCH or HEAD entry asks for what
    this transaction does not do, and was answered "200 OK" as if it had been done."""
    request = entry.get("request")
    if request is None:
        return
    if not isinstance(request, dict):
        raise FhirInvalid(
            [Issue(path, "must be an object (method, url, and ifNoneExist for a conditional create)")]
        )
    methods = ("POST",) if kind == "ServiceRequest" else ("POST", "PUT")
    if request.get("method") not in methods:
        raise FhirInvalid(
            [Issue(f"{path}.method", f"this transaction takes {' or '.join(methods)} entries for a {kind}; "
                                     "each entry carries a resource the case is read from")]
        )  # fmt: skip
    if not isinstance(request.get("ifNoneExist", ""), str):
        raise FhirInvalid([Issue(f"{path}.ifNoneExist", "must be a string: identifier=[system|]value")])


def from_service_request(request: Any) -> FhirRequest:
    resource = validated(request, "ServiceRequest")
    if resource["resourceType"] != "ServiceRequest":
        raise FhirInvalid(
            [Issue("ServiceRequest.resourceType", "POST /fhir/ServiceRequest takes a ServiceRequest")]
        )
    resources: dict[str, list[dict[str, Any]]] = {"ServiceRequest": [resource]}
    for i, contained in enumerate(resource.get("contained") or []):
        item = validated(contained, f"ServiceRequest.contained[{i}]")
        resources.setdefault(item["resourceType"], []).append(item)
    return read_case(resources)


def _one(resources: dict[str, list[dict[str, Any]]], kind: str, required: bool) -> dict[str, Any]:
    found = resources.get(kind, [])
    if len(found) > 1:
        raise FhirInvalid([Issue(kind, f"exactly one {kind} is expected, {len(found)} were sent")])
    if not found and required:
        raise FhirInvalid([Issue(kind, f"a {kind} is required")])
    return found[0] if found else {}


def _first(items: Any) -> dict[str, Any]:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}


def _code(concept: dict[str, Any]) -> str | None:
    coding = _first(concept.get("coding"))
    return coding.get("code") or concept.get("text")


def order_codes(request: dict[str, Any]) -> list[Issue]:
    """What is wrong with the ServiceRequest's status and intent (required bindings; an order not active)."""
    issues = []
    if request.get("intent") not in REQUEST_INTENTS:
        issues.append(Issue("ServiceRequest.intent", "not a request-intent code; send order"))
    status = request.get("status")
    if status not in REQUEST_STATUSES:
        issues.append(Issue("ServiceRequest.status", "not a request-status code; send active"))
    elif status != "active":
        issues.append(
            Issue("ServiceRequest.status", "only an active order opens a case; send it once it is active")
        )
    return issues


def read_case(resources: dict[str, list[dict[str, Any]]]) -> FhirRequest:
    patient = _one(resources, "Patient", True)
    request = _one(resources, "ServiceRequest", True)
    if issues := order_codes(request):
        raise FhirInvalid(issues)
    study = _one(resources, "ImagingStudy", True)
    coverage = _one(resources, "Coverage", False)
    name = _first(patient.get("name"))
    requester = request.get("requester") or {}
    plan: dict[str, Any] = next(
        (
            c
            for c in coverage.get("class") or []
            if "plan" in {x.get("code") for x in (c.get("type") or {}).get("coding", [])}
        ),
        {},
    )
    uid = next(
        (
            i.get("value", "").removeprefix("urn:oid:")
            for i in study.get("identifier") or []
            if i.get("system") == "urn:dicom:uid"
        ),
        None,
    )
    procedure = _first(study.get("procedureCode"))
    order = _first(request.get("identifier"))
    raw: dict[str, Any] = {
        "partner_case_ref": order.get("value"),
        # An identifier with a system and no value names no order (it was ignored, and still is).
        "partner_case_ref_system": order.get("system") if order.get("value") is not None else None,
        "patient": {
            "family_name": name.get("family"),
            "given_name": _first_str(name.get("given")),
            "birth_date": patient.get("birthDate"),
            "sex": patient.get("gender"),
            "mrn": _first(patient.get("identifier")).get("value"),
            "state": _first(patient.get("address")).get("state"),
        },
        "referring": {
            "name": requester.get("display"),
            "npi": (requester.get("identifier") or {}).get("value"),
            "organization": (patient.get("managingOrganization") or {}).get("display"),
        },
        "exam": {
            "exam_type": _code(procedure) if procedure else None,
            "performed_on": str(study.get("started", ""))[:10] or None,
            "facility": (study.get("location") or {}).get("display"),
            "study_instance_uid": uid,
        },
        "clinical_question": _first(request.get("note")).get("text"),
        "reason": _code(_first(request.get("reasonCode"))),
        "coverage": (
            {"member_id": coverage.get("subscriberId"), "plan_code": plan.get("value")}
            if coverage
            else {"self_pay": True}
        ),
    }
    documents = [doc for doc in (_document(d) for d in resources.get("DocumentReference", [])) if doc]
    consent = any(c.get("status") == "active" for c in resources.get("Consent", [])) or any(
        d.kind == DocumentKind.RECORDS_RELEASE_AUTHORIZATION for d in documents
    )
    raw["consent_on_file"] = consent
    raw["gestational_age_weeks"] = gestational_age(resources.get("Observation", []))
    planned = [p for p in resources.get("Procedure", []) if p.get("status") == "preparation"]
    raw["procedure_scheduled_on"] = (
        (str(planned[0].get("performedDateTime", ""))[:10] or None) if planned else None
    )
    try:
        case = CaseCreate.model_validate(_drop_none(raw))
    except ValidationError as exc:
        issues = []
        for e in exc.errors():
            field_path = ".".join(str(p) for p in e["loc"])
            issues.append(Issue(SOURCES.get(field_path, field_path), e["msg"]))
        raise FhirInvalid(issues) from exc
    endpoint = _one(resources, "Endpoint", False).get("address")
    return FhirRequest(case=case, documents=documents, imaging_endpoint=endpoint)


def gestational_age(observations: list[dict[str, Any]]) -> Any:
    for observation in observations:
        codes = {c.get("code") for c in (observation.get("code") or {}).get("coding", [])}
        if GESTATIONAL_AGE_LOINC in codes:
            value = (observation.get("valueQuantity") or {}).get("value")
            return int(value) if isinstance(value, int | float) else value
    return None


def _first_str(items: Any) -> str | None:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], str) else None


def _document(resource: dict[str, Any]) -> DocumentCreate | None:
    attachment = (_first(resource.get("content")) or {}).get("attachment") or {}
    if not attachment.get("data"):
        return None
    codes = {c.get("code") for c in (resource.get("type") or {}).get("coding", [])}
    kind = (
        DocumentKind.RECORDS_RELEASE_AUTHORIZATION if CONSENT_LOINC in codes else DocumentKind.ORIGINAL_REPORT
    )
    try:
        base64.b64decode(attachment["data"], validate=True)
    except ValueError as exc:
        raise FhirInvalid([Issue("DocumentReference.content[0].attachment.data", "not base64")]) from exc
    return DocumentCreate(
        kind=kind,
        title=(attachment.get("title") or resource.get("description") or kind.value)[:200],
        content_type=attachment.get("contentType") or "application/octet-stream",
        content_base64=attachment["data"],
    )


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value
