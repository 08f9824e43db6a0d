"""FHIR R4 intake: `POST /fhir` (transaction Bundle), `POST /fhir/ServiceRequest` and its read
`GET /fhir/ServiceRequest/{id}` (the order as kept), `GET /fhir/Task/{id}` (the case); the searches of both are in
services.intake.fhir_search.

Errors here are OperationOutcome resources that name the element (FHIRPath), never the value sent.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.auth import smart_api
from services.auth.problems import AUTH_ERRORS
from services.common.config import Settings
from services.common.errors import IntakeRejected
from services.common.fhir import (
    PUBLIC_RESOURCES,
    as_preferred,
    etag,
    outcome,
    outcome_response,
    preferred_return,
    unchanged,
    undeclared_router,
    unparseable,
)
from services.common.http import UnreadableJson, fhir_json_only, parse_json
from services.common.openapi import OperationOutcome
from services.intake import fhir_intake, fhir_search, fhir_subscription_api, handlers
from services.intake.api import (
    AuditDep,
    CaseCaller,
    EngineDep,
    IdempotencyKey,
    SessionDep,
    SettingsDep,
    TemporalDep,
    idempotent,
    open_case,
    partner_for,
    same_patient,
    visible_case,
)
from services.intake.fhir_examples import BUNDLE_EXAMPLE, SERVICE_REQUEST_EXAMPLE
from services.intake.fhir_service_request import VERSION, fhir_base, history_location, to_service_request
from services.intake.fhir_subscriptions import TOPIC_CANONICAL, TOPICS, topic_url
from services.intake.fhir_task import to_task
from services.intake.models import Case, CaseCreate
from services.intake.order_reference import ReferenceSearch, SearchInvalid, parse_token

FHIR_JSON = "application/fhir+json"
MAX_FHIR_BYTES = 30 * 1024 * 1024
router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(fhir_json_only)])


def outcome_doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/OperationOutcome"}
    return {
        "description": description,
        "model": OperationOutcome,
        "content": {
            FHIR_JSON: {"schema": schema, "example": example},
        },
    }


TASK_EXAMPLE = {
    "resourceType": "Task",
    "id": "3f6c…",
    "status": "received",
    "intent": "order",
    "focus": {"reference": "ServiceRequest/3f6c…"},
    "businessStatus": {"coding": [{"system": "urn:secondopinion:case-status", "code": "intake"}]},
}
ORDER_EXAMPLE = {
    "resourceType": "ServiceRequest",
    "id": "3f6c…",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-07T10:00:00+00:00"},
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.1", "value": "REF-1001"}],
    "status": "active",
    "intent": "order",
}
OUTCOME_EXAMPLE = outcome("invalid", [("Bundle.entry[0].resource.birthDate", "Date value does not match")])
RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: outcome_doc(
        "No such case visible to the caller", outcome("not-found", [("Task.id", "no Task 3f…")])
    ),
    409: outcome_doc(
        "The first request with this Idempotency-Key is still running",
        outcome("processing", [(None, "retry")]),
    ),
    406: outcome_doc("Only JSON is served", outcome("not-supported", [(None, "send _format=json")])),
    422: outcome_doc("A resource is invalid: the OperationOutcome names each element", OUTCOME_EXAMPLE),
}
POSTED: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    413: outcome_doc(
        "The request is larger than 30 MB",
        outcome("too-costly", [(None, "send documents and images to records and refer to them")]),
    ),
    400: outcome_doc(
        "The body cannot be parsed as JSON (not UTF-8, not JSON, nested too deeply, a number too long)",
        outcome("structure", [(None, "the body is not JSON: Expecting value at line 1 column 1")]),
    ),
    415: outcome_doc(
        "The body is not JSON", outcome("not-supported", [(None, f"Content-Type: {FHIR_JSON}")])
    ),
}
CREATED: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "the order as kept, a FHIR ServiceRequest (its id is the case's: the case's progress is "
        "the Task of the same id); `Location: [base]/ServiceRequest/{id}/_history/1`, `ETag` and `Last-Modified` "
        "its version. With `Prefer: return=minimal` no body, with `return=OperationOutcome` an OperationOutcome "
        "saying what was done",
        "content": {FHIR_JSON: {"example": ORDER_EXAMPLE}},
    },
    **POSTED,
}
TRANSACTION_EXAMPLE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {"response": {"status": "200 OK"}},
        {
            "resource": ORDER_EXAMPLE,
            "response": {
                "status": "201 Created",
                "location": "https://…/fhir/ServiceRequest/3f6c…/_history/1",
                "etag": 'W/"1"',
                "outcome": outcome(
                    "informational",
                    [
                        (
                            None,
                            "created the order and its case: …; its case's progress is the Task https://…/fhir/Task/3f6c…",
                        )
                    ],
                    severity="information",
                ),
            },
        },
    ],
}
CONDITION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: outcome_doc(
        "The body cannot be parsed as JSON; or If-None-Exist (ifNoneExist) searches something else than "
        "identifier, or is malformed",
        outcome("invalid", [("If-None-Exist", "conditional create searches identifier=[system|]value only")]),
    ),
    412: outcome_doc(
        "If-None-Exist (ifNoneExist) names more than one case (a value used under several systems)",
        outcome("multiple-matches", [(None, "send identifier=system|value")]),
    ),
}
TRANSACTED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a transaction-response Bundle: an entry per request entry, in order; the "
        "ServiceRequest's carries the order as kept, its location and an outcome naming its case's Task",
        "content": {FHIR_JSON: {"example": TRANSACTION_EXAMPLE}},
    },
    **POSTED,
    **CONDITION_ERRORS,
}


async def read_json(request: Request) -> Any:
    """The request's JSON, parsed once per request (a transaction reads it for its entries too); UnreadableJson
    when the body cannot be parsed as JSON (a 400, `unparseable`)."""
    if hasattr(request.state, "fhir_json"):
        return request.state.fhir_json
    body = await request.body()
    if len(body) > MAX_FHIR_BYTES:
        raise StarletteHTTPException(
            413,
            "the request is larger than the 30 MB intake's FHIR API takes; send documents and images to records "
            "(uploads, STOW-RS) and refer to them; nothing was stored",
        )
    # Off the event loop, like the validation below: a 30 MB body takes a while, every other request to intake
    # would wait behind it.
    request.state.fhir_json = await run_in_threadpool(parse_json, body)
    return request.state.fhir_json


IfNoneExist = Annotated[
    str | None,
    Header(
        alias="If-None-Exist",
        max_length=300,
        description="conditional create: `identifier=[system|]value` (FHIR token search: `value` under any "
        "system, `|value` without one); a case of yours with that order reference is answered (200) "
        "instead of creating one, two are a 412",
    ),
]


Prefer = Annotated[
    str | None,
    Header(
        alias="Prefer",
        max_length=200,
        description="`return=minimal` (no body), `return=representation` (the Task; the default) or "
        "`return=OperationOutcome` (an OperationOutcome saying what was done); FHIR R4 http.html#ops",
    ),
]


def done(created: bool, location: str) -> str:
    """What a create did, for `Prefer: return=OperationOutcome` and a transaction's entry: the order's
    location, and where its case's progress is (the Task of the same id)."""
    what = (
        "created the order and its case"
        if created
        else ("found your order with this order reference (conditional create)")
    )
    task = location.split("/_history/")[0].replace("/ServiceRequest/", "/Task/")
    return f"{what}: the ServiceRequest is {location}; its case's progress is the Task {task}"


def done_outcome(created: bool, location: str) -> dict[str, Any]:
    return outcome("informational", [(None, done(created, location))], severity="information")


def conditional_reference(query: str) -> ReferenceSearch:
    """The order reference an If-None-Exist (or Bundle.entry.request.ifNoneExist) asks about; only
    `identifier` is searched, as FHIR token search reads it: `value` under any system, `|value` under
    none, `system|value` exactly."""
    try:
        params = parse_qs(query, strict_parsing=True)
    except ValueError:
        params = {}
    values = params.get("identifier") or []
    if set(params) != {"identifier"} or len(values) != 1:
        raise fhir_intake.FhirInvalid(
            [fhir_intake.Issue("If-None-Exist", "conditional create searches identifier=[system|]value only")]
        )
    try:
        return parse_token(values[0])
    except SearchInvalid as exc:
        raise fhir_intake.FhirInvalid([fhir_intake.Issue("If-None-Exist", str(exc))]) from exc


def existing_for(engine: Any, caller: CaseCaller, case: CaseCreate, search: ReferenceSearch) -> Case | None:
    """The caller's case with this order reference (FHIR conditional create); 409 if it is another patient's,
    412 if the search names more than one case (a value under any system, used by two systems)."""
    partner_id = partner_for(case, caller)
    with Session(engine) as session:
        found = handlers.cases_found(search, partner_id, session)
    if len(found) > 1:
        raise StarletteHTTPException(
            412,
            "If-None-Exist names more than one of your cases (the value is used under several systems); "
            "send identifier=system|value, or identifier=|value for the reference sent without a system",
        )
    if found:
        same_patient(found[0], case)
    return found[0] if found else None


async def create_from_fhir(
    request: Request,
    parse: Any,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    idempotency_key: str | None,
    if_none_exist: str | None = None,
) -> JSONResponse:
    try:
        document = await read_json(request)
        # Validating every resource of a large Bundle takes seconds: on the event loop it held every other
        # request to intake that long (a /healthz waited 5 s behind a 28 MB Bundle).
        parsed: fhir_intake.FhirRequest = await run_in_threadpool(parse, document)
        reference = conditional_reference(if_none_exist) if if_none_exist is not None else None
    except UnreadableJson as exc:
        return unparseable(exc)
    except fhir_intake.FhirInvalid as exc:
        status = 400 if exc.issues and exc.issues[0].expression == "If-None-Exist" else 422
        return outcome_response(status, "invalid", [(i.expression, i.diagnostics) for i in exc.issues])
    if reference is not None:
        try:
            found = await run_in_threadpool(existing_for, engine, caller, parsed.case, reference)
        except StarletteHTTPException as exc:
            code = {409: "conflict", 412: "multiple-matches"}.get(exc.status_code, "processing")
            return outcome_response(exc.status_code, code, [(None, str(exc.detail))])
        if found is not None:
            audit("read", "case", found.id, "success")
            order = to_service_request(found)
            return JSONResponse(
                order, status_code=200, media_type=FHIR_JSON, headers=created_headers(settings, order)
            )

    created = False

    async def create() -> dict[str, Any]:
        nonlocal created
        case, timeline = await open_case(
            parsed.case, parsed.documents, caller, audit, engine, temporal, settings
        )
        created = timeline is not None
        return to_service_request(case)

    try:
        # FHIR: 201 only when a case was made; an order reference already used for this patient answers the
        # existing case, 200 (a client counts a 201 as a new order).
        response = await idempotent(
            request,
            caller,
            engine,
            idempotency_key,
            201,
            create,
            media_type=FHIR_JSON,
            answered=lambda: 201 if created else 200,
        )
    except IntakeRejected as exc:
        return outcome_response(422, "business-rule", [(None, str(exc))])
    except StarletteHTTPException as exc:
        return outcome_response(exc.status_code, "processing", [(None, str(exc.detail))])
    answered = json.loads(bytes(response.body))
    if answered.get("resourceType") == "Task":
        # An Idempotency-Key's answer stored before the order was kept as a ServiceRequest: the same case's.
        answered = await run_in_threadpool(service_request_of, engine, answered["id"])
        response = JSONResponse(answered, status_code=response.status_code, media_type=FHIR_JSON,
                                headers={k: v for k, v in response.headers.items() if k.lower() == "idempotent-replayed"})  # fmt: skip
    if answered.get("id"):
        response.headers.update(created_headers(settings, answered))
    return response


def service_request_of(engine: Any, case_id: str) -> dict[str, Any]:
    with Session(engine) as session:
        case = session.get(Case, case_id)
    assert case is not None, "an Idempotency-Key's answer names a case that is kept"
    return to_service_request(case)


def created_headers(settings: Settings, order: dict[str, Any]) -> dict[str, str]:
    """A create's headers (FHIR R4 http.html#create): Location the version made, absolute ("ServiceRequest/{id}"
    resolves against POST /fhir to no route), ETag and Last-Modified."""
    modified = datetime.fromisoformat(order["meta"]["lastUpdated"])
    return {
        "Location": history_location(fhir_base(settings), order["id"]),
        "ETag": etag(order),
        "Last-Modified": format_datetime(modified.astimezone(UTC), usegmt=True),
    }


def transaction_response(
    request_bundle: dict[str, Any],
    order: dict[str, Any],
    location: str,
    created: bool = True,
    returning: str | None = None,
) -> dict[str, Any]:
    """A `transaction-response` Bundle: one entry per request entry, in order (FHIR R4
    http.html#transaction-response). The ServiceRequest's entry carries the order as kept, its location (the
    version made), 201 when created, 200 when a conditional create or its order reference found it, and an
    outcome naming its case's Task; with `Prefer: return=minimal` without the resource, with
    `return=OperationOutcome` the outcome only. The other resources are read into the case, not kept: 200."""
    entries = []
    status = "201 Created" if created else "200 OK"
    for entry in request_bundle.get("entry") or []:
        kind = ((entry or {}).get("resource") or {}).get("resourceType")
        if kind == "ServiceRequest":
            answer: dict[str, Any] = {
                "status": status,
                "location": location,
                "etag": etag(order),
                "lastModified": order["meta"]["lastUpdated"],
                "outcome": done_outcome(created, location),
            }
            shown = {"resource": order} if returning in (None, "representation") else {}
            entries.append({**shown, "response": answer})
        else:
            entries.append({"response": {"status": "200 OK"}})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


def fhir_body(example: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                FHIR_JSON: {
                    "schema": {
                        "type": "object",
                        "description": "a FHIR R4 resource (validated with fhir.resources R4B)",
                    },
                    "example": example,
                }
            },
        }
    }


# `[base]/` too: a client library that builds "[base]/" + "" (fhirpy's execute("")) was redirected, from a URL
# built from the Host header, and the ingress routes `/fhir/` here only by this exact path.
@router.post("/", status_code=200, include_in_schema=False)
@router.post("", status_code=200, responses=TRANSACTED, openapi_extra=fhir_body(BUNDLE_EXAMPLE))
async def transaction(
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> JSONResponse:
    """A transaction Bundle carrying Patient, ServiceRequest, ImagingStudy (with its Endpoint) and optionally
    Coverage, Consent and DocumentReference. Answers a transaction-response Bundle whose ServiceRequest entry
    carries the order as kept, where to read it and an outcome naming its case's Task (`request.ifNoneExist` on
    that entry: conditional create). Without an active Consent or a signed-form DocumentReference (LOINC 59284-0) the case waits in
    `awaiting_consent`."""
    try:
        sent = await read_json(
            request
        )  # parsed once: create_from_fhir and the answer read it again from here
    except (fhir_intake.FhirInvalid, UnreadableJson):
        sent = None  # create_from_fhir answers what is wrong with the body
    response = await create_from_fhir(
        request,
        fhir_intake.from_bundle,
        caller,
        audit,
        engine,
        temporal,
        settings,
        idempotency_key,
        _entry_if_none_exist(sent),
    )
    if response.status_code not in (200, 201):
        return response
    location = response.headers["Location"]
    returning = preferred_return(prefer)
    bundle = transaction_response(
        sent, json.loads(bytes(response.body)), location, response.status_code == 201, returning
    )
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("idempotent-replayed",)}
    if returning is not None:
        headers["Preference-Applied"] = f"return={returning}"
    return JSONResponse(bundle, status_code=200, media_type=FHIR_JSON, headers=headers)


def _entry_if_none_exist(bundle: Any) -> str | None:
    """The ServiceRequest entry's request.ifNoneExist, if the body is a Bundle that has one."""
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        # Read before the Bundle is validated: any element may be of any JSON type (a string `resource` was
        # a 500); from_bundle then names what is wrong with it.
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "ServiceRequest":
            request = entry.get("request")
            value = request.get("ifNoneExist") if isinstance(request, dict) else None
            return value if isinstance(value, str) else None
    return None


CONDITIONAL: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "your order with that order reference, as kept: found by If-None-Exist (conditional "
        "create), or the order sent again for the same patient",
        "content": {FHIR_JSON: {"example": ORDER_EXAMPLE}},
    },
    **CREATED,
    **CONDITION_ERRORS,
}


@router.post(
    "/ServiceRequest",
    status_code=201,
    responses=CONDITIONAL,
    openapi_extra=fhir_body(SERVICE_REQUEST_EXAMPLE),
)
async def service_request(
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
    if_none_exist: IfNoneExist = None,
    prefer: Prefer = None,
) -> Response:
    """A ServiceRequest whose Patient, ImagingStudy and optional Coverage/Consent are `contained`. With
    `If-None-Exist: identifier=[system|]value`, an order of yours with that reference is answered (200)
    instead of created (FHIR conditional create); so is the same order sent again. Answers the order as kept:
    `Location: [base]/ServiceRequest/{id}/_history/1`; its case is the Task of the same id. `Prefer: return=minimal` answers without a body,
    `return=OperationOutcome` with an OperationOutcome saying what was done."""
    answer = await create_from_fhir(
        request,
        fhir_intake.from_service_request,
        caller,
        audit,
        engine,
        temporal,
        settings,
        idempotency_key,
        if_none_exist,
    )
    return as_preferred(answer, prefer, lambda r: done(r.status_code == 201, r.headers["location"]))


CAPABILITY_STATEMENT: dict[str, Any] = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2026-12-07",
    "kind": "instance",
    "software": {"name": "secondopinion intake"},
    "implementation": {"description": "Second opinions on diagnostic ultrasound"},
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [
        {
            "mode": "server",
            "security": {
                "service": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                "code": "SMART-on-FHIR",
                            }
                        ],
                        "text": "SMART Backend Services (client_credentials, private_key_jwt)",
                    }
                ],
                "description": "Authorization: Bearer <access token from the SMART token endpoint> or "
                "Bearer <API key>; see [base]/.well-known/smart-configuration",
            },
            "resource": PUBLIC_RESOURCES,
            "interaction": [{"code": "transaction"}],
        }
    ],
}


def capability_statement(settings: Settings) -> dict[str, Any]:
    """The CapabilityStatement, naming the base a client sends its requests to (our public INTAKE_URL)."""
    statement = copy.deepcopy(CAPABILITY_STATEMENT)
    statement["implementation"]["url"] = f"{settings.intake_url.rstrip('/')}/fhir"
    base = fhir_base(settings)
    for resource in statement["rest"][0]["resource"]:
        if resource["type"] == "Subscription":  # the topics published (Subscriptions R5 Backport IG)
            resource["extension"] = [
                {"url": TOPIC_CANONICAL, "valueCanonical": topic_url(base, topic)} for topic in TOPICS
            ]
    statement["rest"][0]["security"]["extension"] = [
        {
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": smart_api.token_endpoint(settings)}],
        }
    ]
    return statement


@router.get(
    "/metadata",
    responses={
        200: {
            "content": {
                FHIR_JSON: {"example": {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}}
            },
            "description": "what this server supports: ServiceRequest create, read and search, Task read and "
            "search, transaction, and what the other services serve at this base; JSON",
        },
        406: outcome_doc("Only JSON is served", outcome("not-supported", [(None, "send _format=json")])),
    },
)
def metadata(settings: SettingsDep) -> JSONResponse:
    """The server's CapabilityStatement (FHIR R4 `capabilities` interaction); no API key needed."""
    return JSONResponse(capability_statement(settings), media_type=FHIR_JSON)


@router.get(
    "/Task/{task_id}",
    responses={
        200: {"content": {FHIR_JSON: {"example": TASK_EXAMPLE}}, "description": "the case as a FHIR Task"},
        **RESPONSES,
    },
)
def get_task(
    task_id: str,
    session: SessionDep,
    caller: CaseCaller,
    audit: AuditDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """The case as a Task: `status` follows the case, `businessStatus` carries the case status. `ETag` is
    `meta.versionId`; `If-None-Match` with it is answered 304 while the Task is unchanged."""
    try:
        case = visible_case(session, task_id, caller, audit, "read")
    except StarletteHTTPException:
        return outcome_response(
            404, "not-found", [("Task.id", "no Task with this id is visible to this key")]
        )
    audit("read", "case", task_id, "success")
    task = to_task(case)
    if unchanged(if_none_match, task):
        return Response(status_code=304, headers={"ETag": etag(task)})
    return JSONResponse(task, media_type=FHIR_JSON, headers={"ETag": etag(task)})


router.add_api_route(
    "/.well-known/smart-configuration",
    smart_api.well_known,
    methods=["GET"],
    responses=smart_api.SMART_CONFIGURATION_RESPONSES,
    summary="SMART configuration",
)


@router.get(
    "/ServiceRequest/{order_id}",
    responses={
        200: {"content": {FHIR_JSON: {"example": ORDER_EXAMPLE}}, "description": "your order as kept"},
        **RESPONSES,
    },
)
def get_service_request(
    order_id: str,
    session: SessionDep,
    caller: CaseCaller,
    audit: AuditDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """Your order as kept (its id is its case's, the Task's): what was read from it, the patient named as the
    case's (never by name or MRN). It never changes: `ETag` W/"1"; `If-None-Match` with it is answered 304."""
    return read_order(order_id, None, session, caller, audit, if_none_match)


@router.get(
    "/ServiceRequest/{order_id}/_history/{version_id}",
    responses={
        200: {"content": {FHIR_JSON: {"example": ORDER_EXAMPLE}}, "description": "your order as kept"},
        **RESPONSES,
    },
)
def get_service_request_version(
    order_id: str,
    version_id: str,
    session: SessionDep,
    caller: CaseCaller,
    audit: AuditDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """A version of your order (vread; the Location a create answers): an order is kept as received, so it
    has one version, 1."""
    return read_order(order_id, version_id, session, caller, audit, if_none_match)


def read_order(order_id: str, version_id: str | None, session: Session, caller: Any, audit: Any,
               if_none_match: str | None) -> Response:  # fmt: skip
    try:
        case = visible_case(session, order_id, caller, audit, "read")
    except StarletteHTTPException:
        return outcome_response(
            404, "not-found", [("ServiceRequest.id", "no ServiceRequest with this id is visible to this key")]
        )
    if version_id is not None and version_id != VERSION:
        return outcome_response(
            404, "not-found", [("ServiceRequest.meta.versionId", f"an order has one version, {VERSION}")]
        )
    audit("read", "case", order_id, "success")
    order = to_service_request(case)
    if unchanged(if_none_match, order):
        return Response(status_code=304, headers={"ETag": etag(order)})
    modified = format_datetime(
        datetime.fromisoformat(order["meta"]["lastUpdated"]).astimezone(UTC), usegmt=True
    )
    return JSONResponse(order, media_type=FHIR_JSON, headers={"ETag": etag(order), "Last-Modified": modified})


fhir_search.add_routes(router)
fhir_subscription_api.add_routes(router)

# What the CapabilityStatement does not declare: a 405 naming what the type supports, or a 404 naming the types
# served (services.common.fhir). Included last, so only requests no route above takes arrive there.
router.include_router(undeclared_router("intake"))
