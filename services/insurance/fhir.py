"""/fhir/CoverageEligibilityRequest: eligibility and benefits asked in FHIR R4, answered as a response."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from contracts.models import Coverage
from services.auth import Role, require_role
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.fhir import as_preferred, outcome_response, undeclared_router, unparseable
from services.common.http import UnreadableJson, fhir_json_only, parse_json
from services.insurance import fhir_resources, handlers
from services.insurance.api import SessionDep
from services.insurance.fhir_resources import FhirInvalid
from services.insurance.x12_connector import Subscriber

# Every FHIR route of this service speaks JSON and FHIR R4 only.
router = APIRouter(
    prefix="/fhir",
    tags=["fhir"],
    dependencies=[Depends(fhir_json_only)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
# Eligibility asks carry a member id: partners and operations only (nothing is stored).
PARTNERS_AND_OPERATIONS = [Depends(require_role(Role.PARTNER, Role.OPERATIONS))]
FHIR_JSON = "application/fhir+json"
Prefer = Annotated[
    str | None,
    Header(
        alias="Prefer",
        max_length=200,
        description="`return=representation` (the CoverageEligibilityResponse; the default), `return=minimal` "
        "(no body) or `return=OperationOutcome` (an OperationOutcome saying what was done); FHIR R4 http.html#ops",
    ),
]


def _outcome(status: int, expression: str, message: str, code: str = "invalid") -> JSONResponse:
    return outcome_response(status, code, [(expression, message)])


@router.post(
    "/CoverageEligibilityRequest",
    dependencies=PARTNERS_AND_OPERATIONS,
    responses={
        200: {
            "description": "a CoverageEligibilityResponse (with `Prefer: return=minimal` no body, with "
            "`return=OperationOutcome` an OperationOutcome saying what was done)",
            "content": {FHIR_JSON: {}},
        },
        400: {"description": "a body that cannot be parsed as JSON: an OperationOutcome saying why"},
        422: {"description": "an invalid resource: an OperationOutcome naming the element"},
    },
)
async def request_eligibility(request: Request, session: SessionDep, prefer: Prefer = None) -> Response:
    """Eligibility and benefits for the plan and member of the contained Coverage (nothing is stored)."""
    raw = await request.body()
    # Validating a large resource takes seconds, and the payer's connector waits on the payer: on the event
    # loop either held every other request to this service.
    answer = await run_in_threadpool(_eligibility, raw, session)
    return as_preferred(answer, prefer, _done)


def _done(answer: JSONResponse) -> str:
    """What an eligibility answer said, for `Prefer: return=OperationOutcome`: its outcome and whether the
    coverage is in force (no member id, no amount)."""
    response = json.loads(bytes(answer.body))
    inforce = (response.get("insurance") or [{}])[0].get("inforce")
    said = {True: "; the coverage is in force", False: "; the coverage is not in force"}.get(inforce, "")
    return (
        f"eligibility was asked: outcome {response.get('outcome')}{said}. The CoverageEligibilityResponse is "
        "not kept: ask with Prefer: return=representation (the default) for its benefits"
    )


def _eligibility(raw: bytes, session: Session) -> JSONResponse:
    try:
        body = parse_json(raw)
    except UnreadableJson as exc:
        return unparseable(exc)
    try:
        ask = fhir_resources.read_request(body)
    except FhirInvalid as exc:
        return _outcome(422, exc.expression, f"{exc}; fix the element named and send it again")
    if len(ask.plan_code) > 50 or len(ask.member_id) > 50:
        return _outcome(
            422, "Coverage.subscriberId", "the plan code and member id are at most 50 characters", "too-long"
        )
    coverage = Coverage(plan_code=ask.plan_code, member_id=ask.member_id)
    cpt = f"{ask.cpt}-{ask.modifier}" if ask.modifier else ask.cpt
    try:
        subscriber = Subscriber(ask.last_name, ask.first_name, ask.birth_date, ask.gender)
        estimate, rule = handlers.estimate_for(
            session, coverage, cpt, trace=f"fhir-{uuid.uuid4().hex[:12]}", subscriber=subscriber
        )
    except LookupError:
        return _outcome(
            422,
            "CoverageEligibilityRequest.item[0].productOrService",
            "the CPT code (with its modifier) is not a service we price; ask for 76140 or the study's CPT "
            "with modifier 26",
            "business-rule",
        )
    response = fhir_resources.eligibility_response(ask, estimate, rule, body.get("id"))
    return JSONResponse(response, media_type=FHIR_JSON)


# What no route above takes is answered as the CapabilityStatement at the public base declares it (405 naming
# what is served, 404 naming the types served). Included last.
router.include_router(undeclared_router("insurance"))
