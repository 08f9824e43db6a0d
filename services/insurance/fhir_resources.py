"""FHIR R4 resources of coverage (validated with fhir.resources' R4B models): Coverage, eligibility, outcomes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.coverage import Coverage as FhirCoverage
from fhir.resources.R4B.coverageeligibilityrequest import CoverageEligibilityRequest
from fhir.resources.R4B.coverageeligibilityresponse import CoverageEligibilityResponse
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydantic import ValidationError

from services.insurance.estimate import CostEstimate
from services.insurance.models import CoverageVerification, InsurancePlan

CPT = "http://www.ama-assn.org/go/cpt"
COVERAGE_CLASS = "http://terminology.hl7.org/CodeSystem/coverage-class"
BENEFIT_TYPE = "http://terminology.hl7.org/CodeSystem/benefit-type"
NETWORK = "http://terminology.hl7.org/CodeSystem/benefit-network"
ERROR_OUTCOMES = {
    "payer_rejected",
    "payer_unavailable",
    "malformed_response",
    "member_mismatch",
    "payer_unknown",
}


class FhirInvalid(ValueError):
    """A resource that does not validate; `expression` names the element (FHIRPath)."""

    def __init__(self, message: str, expression: str) -> None:
        super().__init__(message)
        self.expression = expression


@dataclass(frozen=True)
class EligibilityAsk:
    """What a CoverageEligibilityRequest asks, read from it and its contained Coverage."""

    plan_code: str
    member_id: str
    cpt: str
    modifier: str
    patient: dict[str, Any]  # the request's Reference as given (literal, logical or display)
    insurer: dict[str, Any]
    coverage_reference: str
    # From a contained Patient (#id): what the 270's NM1*IL / DMG need (005010X279A1 1.4.8.1).
    last_name: str = ""
    first_name: str = ""
    birth_date: str = ""  # YYYYMMDD
    gender: str = ""


def _json(resource: Any) -> dict[str, Any]:
    return json.loads(resource.model_dump_json(exclude_none=True))  # type: ignore[no-any-return]


def operation_outcome(problems: list[tuple[str, str]]) -> dict[str, Any]:
    """An OperationOutcome with one error issue per (FHIRPath expression, message)."""
    issues = [
        {"severity": "error", "code": "invalid", "diagnostics": message, "expression": [expression]}
        for expression, message in problems
    ]
    return _json(OperationOutcome.model_validate({"resourceType": "OperationOutcome", "issue": issues}))


def validation_problems(resource_type: str, exc: ValidationError) -> list[tuple[str, str]]:
    """(element, message) per error, never the offending value."""
    out = []
    for err in exc.errors()[:10]:
        path = resource_type
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        out.append((path, err["msg"]))
    return out


def read_request(body: Any) -> EligibilityAsk:
    """Validate a CoverageEligibilityRequest and read plan, member and CPT from it; raises FhirInvalid."""
    if not isinstance(body, dict) or body.get("resourceType") != "CoverageEligibilityRequest":
        raise FhirInvalid(
            "the body must be a CoverageEligibilityRequest resource", "CoverageEligibilityRequest"
        )
    try:
        request = CoverageEligibilityRequest.model_validate(body)
    except ValidationError as exc:
        expression, message = validation_problems("CoverageEligibilityRequest", exc)[0]
        raise FhirInvalid(message, expression) from exc
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        # fhir.resources raises these, not a ValidationError, for a contained resource of an unknown or
        # non-string resourceType and for elements nested deeper than it reads (each was a 500).
        raise FhirInvalid(
            "not a valid FHIR R4 resource: a contained resource of an unknown type, or elements nested too "
            "deep",
            "CoverageEligibilityRequest",
        ) from exc
    # fhir.resources checks types and cardinality, not required value-set bindings: these two are ours.
    if request.status not in {"active", "cancelled", "draft", "entered-in-error"}:
        raise FhirInvalid(
            "status must be one of active, cancelled, draft, entered-in-error",
            "CoverageEligibilityRequest.status",
        )
    if request.status != "active" or not {"benefits", "validation"} & set(request.purpose or []):
        raise FhirInvalid(
            "only an active request with purpose benefits or validation is answered",
            "CoverageEligibilityRequest.purpose",
        )
    if not request.insurance or not request.insurance[0].coverage.reference:
        raise FhirInvalid(
            "insurance[0].coverage must reference the member's Coverage (contained, e.g. #coverage)",
            "CoverageEligibilityRequest.insurance[0].coverage",
        )
    reference = request.insurance[0].coverage.reference
    contained = {f"#{r.id}": r for r in request.contained or []}
    coverage = contained.get(reference)
    if not isinstance(coverage, FhirCoverage):
        raise FhirInvalid(
            "the Coverage referenced is not contained in the request; contain it and reference it as #id",
            "CoverageEligibilityRequest.insurance[0].coverage.reference",
        )
    plan = next(
        (c.value for c in coverage.class_fhir or [] if any(x.code == "plan" for x in c.type.coding or [])),
        None,
    )
    if not plan:
        raise FhirInvalid(
            "the contained Coverage has no class of type plan (the plan code)", "Coverage.class"
        )
    if not coverage.subscriberId:
        raise FhirInvalid(
            "the contained Coverage has no subscriberId (the member id)", "Coverage.subscriberId"
        )
    cpt, modifier = "76140", ""
    for item in request.item or []:
        codes = [
            c.code
            for c in (item.productOrService.coding if item.productOrService else None) or []
            if c.system == CPT
        ]
        if codes:
            cpt = codes[0] or cpt
            modifier = next((c.code or "" for m in item.modifier or [] for c in m.coding or []), "")
            break
    patient = contained.get(request.patient.reference or "")
    name = (getattr(patient, "name", None) or [None])[0]
    birth = getattr(patient, "birthDate", None)
    return EligibilityAsk(
        last_name=(name.family or "") if name else "",
        first_name=((name.given or [""])[0] or "") if name else "",
        birth_date=birth.strftime("%Y%m%d") if birth else "",
        gender={"female": "F", "male": "M"}.get(
            getattr(patient, "gender", None) or "", "U" if patient else ""
        ),
        plan_code=plan,
        member_id=coverage.subscriberId,
        cpt=cpt,
        modifier=modifier,
        patient=_json(request.patient),
        insurer=_json(request.insurer),
        coverage_reference=reference,
    )


def _money(amount: Decimal) -> dict[str, Any]:
    return {"value": float(amount), "currency": "USD"}


def eligibility_response(
    ask: EligibilityAsk, estimate: CostEstimate, authorization_rule: str, request_id: str
) -> dict[str, Any]:
    covered = estimate.coverage_status == "covered"
    benefits = [
        {
            "type": {"coding": [{"system": BENEFIT_TYPE, "code": "benefit"}]},
            "allowedMoney": _money(estimate.allowed_amount),
        },
        {
            "type": {"coding": [{"system": BENEFIT_TYPE, "code": "copay"}]},
            "allowedMoney": _money(estimate.copay),
        },
        {
            "type": {"coding": [{"system": BENEFIT_TYPE, "code": "deductible"}]},
            "allowedMoney": _money(estimate.deductible_applied),
        },
    ]
    product = {"coding": [{"system": CPT, "code": ask.cpt}]}
    failed = estimate.outcome in ERROR_OUTCOMES
    item: dict[str, Any] = {
        "productOrService": product,
        "authorizationRequired": authorization_rule != "none",
        "description": estimate.explanation,
    }
    if not failed:  # the payer did not say; neither do we
        item["excluded"] = not covered
    if estimate.network in {"in", "out"}:
        item["network"] = {"coding": [{"system": NETWORK, "code": estimate.network}]}
    if ask.modifier:
        item["modifier"] = [{"coding": [{"system": CPT, "code": ask.modifier}]}]
    if covered:
        item["benefit"] = benefits
    resource: dict[str, Any] = {
        "resourceType": "CoverageEligibilityResponse",
        "status": "active",
        "purpose": ["benefits"],
        "patient": ask.patient,
        "created": datetime.now(UTC).isoformat(),
        "request": {"reference": f"CoverageEligibilityRequest/{request_id}"},
        "outcome": "error" if failed else "complete",
        "disposition": estimate.explanation,
        "insurer": ask.insurer,
        "insurance": [{"coverage": {"display": f"plan {ask.plan_code}"}, "item": [item]}],
    }
    if not failed:
        resource["insurance"][0]["inforce"] = covered
    if resource["outcome"] == "error":
        resource["error"] = [{"code": {"text": estimate.outcome}}]
    return _json(CoverageEligibilityResponse.model_validate(resource))


def coverage(row: CoverageVerification, plan: InsurancePlan | None) -> dict[str, Any]:
    """A case's coverage as a FHIR Coverage; the member id is masked to its last four characters."""
    member = row.member_id or ""
    resource: dict[str, Any] = {
        "resourceType": "Coverage",
        "id": row.case_id,
        "status": "cancelled" if row.cancelled_at or row.outcome == "inactive" else "active",
        "beneficiary": {"display": f"patient of case {row.case_id}"},
        "payor": [{"display": plan.payer_name if plan else "self-pay"}],
        "network": row.network,
        "costToBeneficiary": [
            {"type": {"text": "copay"}, "valueMoney": _money(row.copay)},
            {"type": {"text": "patient share for CPT " + row.cpt}, "valueMoney": _money(row.patient_cost)},
        ],
    }
    if member:
        resource["subscriberId"] = "*" * max(0, len(member) - 4) + member[-4:]
    if row.plan_code:
        resource["class"] = [
            {"type": {"coding": [{"system": COVERAGE_CLASS, "code": "plan"}]}, "value": row.plan_code}
        ]
    return _json(FhirCoverage.model_validate(resource))
