"""/fhir/CoverageEligibilityRequest: eligibility and benefits asked in FHIR R4, answered as a response."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from contracts.models import Coverage
from services.auth import Role, require_role
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.http import UnreadableJson, fhir_json_only, parse_json
from services.insurance import fhir_resources, handlers
from services.insurance.api import SessionDep
from services.insurance.fhir_resources import FhirInvalid
from services.insurance.x12_connector import Subscriber

# Eligibility asks carry a member id: partners and operations only (nothing is stored).
router = APIRouter(
    prefix="/fhir",
    tags=["fhir"],
    dependencies=[Depends(require_role(Role.PARTNER, Role.OPERATIONS)), Depends(fhir_json_only)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
FHIR_JSON = "application/fhir+json"


def _outcome(status: int, expression: str, message: str) -> JSONResponse:
    body = fhir_resources.operation_outcome([(expression, message)])
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


@router.post(
    "/CoverageEligibilityRequest",
    responses={
        200: {"description": "a CoverageEligibilityResponse", "content": {FHIR_JSON: {}}},
        400: {"description": "not JSON: an OperationOutcome"},
        422: {"description": "an invalid resource: an OperationOutcome naming the element"},
    },
)
async def request_eligibility(request: Request, session: SessionDep) -> JSONResponse:
    """Eligibility and benefits for the plan and member of the contained Coverage (nothing is stored)."""
    raw = await request.body()
    # Validating a large resource takes seconds, and the payer's connector waits on the payer: on the event
    # loop either held every other request to this service.
    return await run_in_threadpool(_eligibility, raw, session)


def _eligibility(raw: bytes, session: Session) -> JSONResponse:
    try:
        body = parse_json(raw)
    except UnreadableJson as exc:
        return _outcome(400, "CoverageEligibilityRequest", f"{exc}; send a FHIR JSON resource")
    try:
        ask = fhir_resources.read_request(body)
    except FhirInvalid as exc:
        return _outcome(422, exc.expression, f"{exc}; fix the element named and send it again")
    if len(ask.plan_code) > 50 or len(ask.member_id) > 50:
        return _outcome(422, "Coverage.subscriberId", "the plan code and member id are at most 50 characters")
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
        )
    response = fhir_resources.eligibility_response(ask, estimate, rule, body.get("id"))
    return JSONResponse(response, media_type=FHIR_JSON)
