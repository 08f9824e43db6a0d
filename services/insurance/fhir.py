"""/fhir/CoverageEligibilityRequest: eligibility and benefits asked in FHIR R4, answered as a
CoverageEligibilityResponse that is kept (FHIR create: 201, `Location` the response's version) and read at
/fhir/CoverageEligibilityResponse/{id} by the partner that asked; the request is kept with it, under the same id,
and read at /fhir/CoverageEligibilityRequest/{id} (the response's `request` names it).

Why a create and not `$eligibility`: R4 defines no such operation; the financial module's exchange is the POST of
the request answered with the response (financial-module.html#eligibility), and a partner's client (fhirpy,
HAPI) creates the request and reads the response back by the Location, as it does for any create."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from contracts.models import Coverage
from services.auth import AuthEngine, Principal, Role, require_role
from services.auth.access import record
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.config import Settings, get_settings
from services.common.fhir import (
    as_preferred,
    etag,
    outcome_response,
    unchanged,
    undeclared_router,
    unparseable,
)
from services.common.http import UnreadableJson, fhir_json_only, parse_json
from services.insurance import fhir_resources, handlers
from services.insurance.api import SessionDep
from services.insurance.fhir_resources import FhirInvalid
from services.insurance.models import EligibilityResponse
from services.insurance.x12_connector import Subscriber

# Every FHIR route of this service speaks JSON and FHIR R4 only.
router = APIRouter(
    prefix="/fhir",
    tags=["fhir"],
    dependencies=[Depends(fhir_json_only)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
# Eligibility asks carry a member id: partners and operations only; the answer is kept for the partner that asked.
Asker = Annotated[Principal, Depends(require_role(Role.PARTNER, Role.OPERATIONS))]
SettingsDep = Annotated[Settings, Depends(get_settings)]
VERSION = "1"
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
    status_code=201,
    responses={
        201: {
            "description": "the CoverageEligibilityResponse, kept: `Location: "
            "[base]/CoverageEligibilityResponse/{id}/_history/1`, `ETag`, `Last-Modified` (with `Prefer: "
            "return=minimal` no body, with `return=OperationOutcome` an OperationOutcome saying what was done)",
            "content": {FHIR_JSON: {}},
        },
        400: {"description": "a body that cannot be parsed as JSON: an OperationOutcome saying why"},
        422: {"description": "an invalid resource: an OperationOutcome naming the element"},
    },
)
async def request_eligibility(
    request: Request, session: SessionDep, caller: Asker, settings: SettingsDep, prefer: Prefer = None
) -> Response:
    """Eligibility and benefits for the plan and member of the contained Coverage, answered as a
    CoverageEligibilityResponse that is kept: read it again at the Location. The request is kept with it, under
    the same id: the response's `request` names it (`CoverageEligibilityRequest/{id}`), readable by your
    partner."""
    raw = await request.body()
    # Validating a large resource takes seconds, and the payer's connector waits on the payer: on the event
    # loop either held every other request to this service.
    answer = await run_in_threadpool(_eligibility, raw, session, caller, fhir_base(settings))
    return as_preferred(answer, prefer, _done)


def fhir_base(settings: Settings) -> str:
    """Our public FHIR base (INSURANCE_URL), never one built from the request's Host header."""
    return f"{settings.insurance_url.rstrip('/')}/fhir"


def _headers(resource: dict[str, Any], base: str | None) -> dict[str, str]:
    modified = datetime.fromisoformat(resource["meta"]["lastUpdated"]).astimezone(UTC)
    headers = {"ETag": etag(resource), "Last-Modified": format_datetime(modified, usegmt=True)}
    if base is not None:
        headers["Location"] = f"{base}/CoverageEligibilityResponse/{resource['id']}/_history/{VERSION}"
    return headers


@router.get(
    "/CoverageEligibilityResponse/{response_id}",
    responses={
        200: {
            "description": 'the CoverageEligibilityResponse as answered; `ETag` W/"1"',
            "content": {FHIR_JSON: {}},
        },
        304: {"description": "If-None-Match names its version: it never changes"},
        404: {"description": "no response with this id asked by your partner: an OperationOutcome"},
    },
)
def read_eligibility_response(
    response_id: str,
    request: Request,
    session: SessionDep,
    caller: Asker,
    auth: AuthEngine,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """The answer to a CoverageEligibilityRequest your partner sent (another partner's is a 404). It carries the
    member's coverage: each read is audited."""
    return _read_kept(
        "CoverageEligibilityResponse", response_id, request, session, caller, auth, if_none_match
    )


@router.get(
    "/CoverageEligibilityRequest/{request_id}",
    responses={
        200: {
            "description": 'the CoverageEligibilityRequest as sent, with the id the server gave it; `ETag` W/"1"',
            "content": {FHIR_JSON: {}},
        },
        304: {"description": "If-None-Match names its version: it never changes"},
        404: {"description": "no request with this id sent by your partner (or answered before requests were "
                             "kept): an OperationOutcome"},
    },
)  # fmt: skip
def read_eligibility_request(
    request_id: str,
    request: Request,
    session: SessionDep,
    caller: Asker,
    auth: AuthEngine,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """The CoverageEligibilityRequest your partner sent, as sent, with the id the server gave it (the id of its
    CoverageEligibilityResponse). It carries the patient and the member's coverage: each read is audited."""
    return _read_kept("CoverageEligibilityRequest", request_id, request, session, caller, auth, if_none_match)


def _read_kept(
    kind: str,
    kept_id: str,
    request: Request,
    session: Session,
    caller: Principal,
    auth: Any,
    if_none_match: str | None,
) -> Response:
    """A kept CoverageEligibilityResponse or the CoverageEligibilityRequest it answers (the same row), for the
    partner that asked: audited, 304 while the client holds its version."""
    row = session.get(EligibilityResponse, kept_id)
    if row is not None and not caller.sees(row.partner_id):
        record(request, auth, caller, "eligibility", None, "denied", f"another partner's {kind}")
        row = None
    kept = None if row is None else row.resource if kind == "CoverageEligibilityResponse" else row.request
    if kept is None:
        before = " and kept: it was answered before requests were kept" if row is not None else ""
        return _outcome(
            404, f"{kind}.id", f"no {kind} with this id was asked by your key's partner{before}", "not-found"
        )
    record(request, auth, caller, "eligibility", None, "success")
    resource = json.loads(kept)
    headers = _headers(resource, None)
    if unchanged(if_none_match, resource):
        return Response(status_code=304, headers=headers)
    return JSONResponse(resource, media_type=FHIR_JSON, headers=headers)


def _done(answer: JSONResponse) -> str:
    """What an eligibility answer said, for `Prefer: return=OperationOutcome`: its outcome and whether the
    coverage is in force (no member id, no amount)."""
    response = json.loads(bytes(answer.body))
    inforce = (response.get("insurance") or [{}])[0].get("inforce")
    said = {True: "; the coverage is in force", False: "; the coverage is not in force"}.get(inforce, "")
    return (
        f"eligibility was asked: outcome {response.get('outcome')}{said}. The CoverageEligibilityResponse is "
        f"kept: read it at {answer.headers['location']} for its benefits"
    )


def _eligibility(raw: bytes, session: Session, caller: Principal, base: str) -> JSONResponse:
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
    # Created as FHIR creates: the server gives the request its id (the one sent, if any, is not kept), the
    # response's, so that the response's `request` names what was kept.
    kept_id, now = str(uuid.uuid4()), datetime.now(UTC)
    meta = {"versionId": VERSION, "lastUpdated": now.isoformat()}
    response = fhir_resources.eligibility_response(ask, estimate, rule, kept_id)
    response = {**response, "id": kept_id, "meta": meta}
    kept_request = {"resourceType": body["resourceType"], "id": kept_id, "meta": meta}
    kept_request |= {k: v for k, v in body.items() if k not in kept_request}
    session.add(
        EligibilityResponse(
            id=kept_id,
            partner_id=caller.partner_id or "",
            resource=json.dumps(response),
            request=json.dumps(kept_request),
            created_at=now,
        )
    )
    session.commit()
    return JSONResponse(response, status_code=201, media_type=FHIR_JSON, headers=_headers(response, base))


# What no route above takes is answered as the CapabilityStatement at the public base declares it (405 naming
# what is served, 404 naming the types served). Included last.
router.include_router(undeclared_router("insurance"))
