"""What the FHIR routes of every service share: the one public FHIR base behind the ingress (intake, review and
insurance each serve some of its resource types), what its CapabilityStatement declares there, and how each
service answers a FHIR client the same way: OperationOutcomes, the route answering what is not declared (405
naming what the type supports, 404 naming the types served), versions (ETag, If-None-Match), `Prefer: return=`
and a body that cannot be parsed (400; a parsed resource that breaks a rule is a 422)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.common.fhir_params import ORDER_PARAMS, REPORT_PARAMS, TASK_INCLUDES, TASK_PARAMS
from services.common.fhir_params import declared as declared_params
from services.common.http import UnreadableJson

FHIR_JSON = "application/fhir+json"

SEARCHED = (
    "Search (GET [base]/{type}?… or POST [base]/{type}/_search with a form body) answers a searchset Bundle "
    "of your own cases only (another partner's are not there: an empty Bundle, not a 404), newest first, with "
    "`total` and absolute self/next links (`_count` 20 by default, at most 100; follow `next` to page). An "
    "unknown parameter is ignored and left out of the self link, or with `Prefer: handling=strict` a 400 naming "
    "it; a value that cannot be read is a 400 naming the parameter."
)
# The resource types served at the public base, and what each supports there (CapabilityStatement.rest.resource).
PUBLIC_RESOURCES: list[dict[str, Any]] = [
    {
        "type": "ServiceRequest",
        "interaction": [{"code": "create"}, {"code": "read"}, {"code": "vread"}, {"code": "search-type"}],
        "versioning": "versioned",
        "conditionalCreate": True,
        "searchParam": declared_params(ORDER_PARAMS),
        "documentation": "The order opens a case. The create answers the order as kept (201, or 200 when your "
        "order reference already made it: the same order sent again, or If-None-Exist), with `Location: "
        "[base]/ServiceRequest/{id}/_history/1`, ETag and meta; Prefer: return=minimal | representation | "
        "OperationOutcome is honoured. It is kept as received, one version; its id is the case's, and the case's "
        "progress is the Task of the same id (Task.focus and Task.basedOn reference the order). " + SEARCHED,
    },
    {
        "type": "Task",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "versioned",
        "searchParam": declared_params(TASK_PARAMS),
        "searchInclude": TASK_INCLUDES,
        "documentation": "The case: `status` follows it, `businessStatus` carries the case status, `focus` and "
        "`basedOn` the order (ServiceRequest/{id}, the same id). meta.versionId is the ETag: poll with "
        "If-None-Match (304 while unchanged). Find your order's Task with ?focus=ServiceRequest/{id}, or "
        "?group-identifier=[system|]value (your order reference). " + SEARCHED,
    },
    {
        "type": "Subscription",
        "interaction": [
            {"code": "create"},
            {"code": "read"},
            {"code": "update"},
            {"code": "search-type"},
            {"code": "delete"},
        ],
        "versioning": "versioned-update",
        "updateCreate": False,
        "searchParam": [
            {"name": "status", "type": "token", "documentation": "requested | active | error | off"}
        ],
        "operation": [
            {
                "name": "status",
                "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/"
                "backport-subscription-status",
            }
        ],
        "documentation": "Topic-based subscriptions per the Subscriptions R5 Backport IG on R4: `criteria` one of "
        "the SubscriptionTopic canonicals declared here (case-status: the case's Task changed status, filtered with "
        "the backport-filter-criteria extension `Task?status=code[,code]`; report-ready: the case's report is "
        "ready), a rest-hook channel to an https URL at a public address, payload application/fhir+json with "
        "backport-payload-content empty | id-only (default) | full-resource, channel.header sent with every "
        "notification (and shown masked on read), backport-heartbeat-period honoured. Created `requested`; a "
        "handshake answered 2xx makes it `active`; `error` (with `error`) while notifications fail. Notifications "
        "are numbered per subscription and sent in order, at least once (webhook-id the same on a retry); DELETE "
        'turns it off (still readable). Update (PUT the whole resource, If-Match W/"n" honoured: another '
        "version is a 412) changes the filter, endpoint, headers (sent back masked: kept), heartbeat, payload "
        "content, and status (`off`; `requested` turns an off or error one back on); a new endpoint or headers, or "
        "back on, sends a new handshake, and what was pending goes to the new endpoint after it. The topic cannot "
        "change (422: create another); update does not create (404). Another partner's is a 404.",
    },
    {
        "type": "DiagnosticReport",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "versioned",
        "searchParam": declared_params(REPORT_PARAMS),
        "documentation": "Served at this base by the review service: the delivered case's Task.output names "
        "the report's URL; find the report of your order with ?based-on=ServiceRequest/{id} or "
        "?based-on:identifier=[system|]value (your order reference). Each addendum (an answer to a follow-up "
        "question, the specialist's own) is a new version: meta.versionId is the ETag, If-None-Match answers 304 "
        "while unchanged; only the latest version is served (no vread). " + SEARCHED,
    },
    {
        "type": "CoverageEligibilityRequest",
        "interaction": [{"code": "create"}, {"code": "read"}],
        "versioning": "versioned",
        "documentation": "Served at this base by the insurance service: answered at once with the "
        "CoverageEligibilityResponse for the contained Coverage, which is kept: 201 with `Location: "
        "[base]/CoverageEligibilityResponse/{id}/_history/1`. The request is kept with it under the same id (the "
        "response's `request` names it), read by the partner that sent it; neither changes (version 1). Prefer: "
        "return=minimal | representation | OperationOutcome is honoured.",
    },
    {
        "type": "CoverageEligibilityResponse",
        "interaction": [{"code": "read"}],
        "versioning": "versioned",
        "documentation": "Served at this base by the insurance service: the answer to a "
        "CoverageEligibilityRequest, read by the partner that asked (another partner's is a 404); it never "
        "changes (version 1).",
    },
]
SERVED_BY = {"ServiceRequest": "intake", "Task": "intake", "Subscription": "intake", "DiagnosticReport": "review",
             "CoverageEligibilityRequest": "insurance", "CoverageEligibilityResponse": "insurance"}  # fmt: skip
# Where each interaction is served (FHIR R4 http.html), to say what is served when a request asks for another.
INTERACTIONS = {"create": ("POST", "[base]/{type}"), "read": ("GET", "[base]/{type}/{id}"),
                "vread": ("GET", "[base]/{type}/{id}/_history/{vid}"), "update": ("PUT", "[base]/{type}/{id}"),
                "search-type": ("GET", "[base]/{type}"), "delete": ("DELETE", "[base]/{type}/{id}")}  # fmt: skip
EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def outcome(code: str, issues: list[tuple[str | None, str]], severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": severity, "code": code, "diagnostics": text, **({"expression": [where]} if where else {})}
            for where, text in issues
        ],
    }  # fmt: skip


def outcome_response(status: int, code: str, issues: list[tuple[str | None, str]]) -> JSONResponse:
    return JSONResponse(outcome(code, issues), status_code=status, media_type=FHIR_JSON)


def declared() -> dict[str, list[str]]:
    """Each resource type served at the public base with its interactions."""
    return {r["type"]: [i["code"] for i in r["interaction"]] for r in PUBLIC_RESOURCES}


def unparseable(exc: UnreadableJson) -> JSONResponse:
    """400: a body that cannot be parsed as JSON (FHIR R4 http.html: 400 for a resource that could not be
    parsed, 422 for one that breaks a rule); says why, never quoting the body."""
    return outcome_response(
        400, "structure", [(None, f"{exc}; send the resource as FHIR JSON; nothing was stored")]
    )


def etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def unchanged(if_none_match: str | None, resource: dict[str, Any]) -> bool:
    """Whether an If-None-Match names this version (RFC 9110 13.1.2: weak comparison, `*` any)."""
    if if_none_match is None:
        return False
    # A bare versionId is taken too: fhirpy's refresh() sends meta.versionId as it is.
    tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
    return "*" in tags or str(resource["meta"]["versionId"]) in tags


RETURNS = ("minimal", "representation", "OperationOutcome")


def preferred_return(prefer: str | None) -> str | None:
    """The `return` preference of a Prefer header (RFC 7240: preferences by comma, parameters after `;`), or
    None when there is none we know (a preference the server does not know is ignored)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].partition("=")
        chosen = value.strip().strip('"')
        if name.strip().lower() == "return" and chosen in RETURNS:
            return chosen
    return None


KEPT_HEADERS = ("location", "etag", "idempotent-replayed", "preference-applied")


def as_preferred(response: JSONResponse, prefer: str | None, done: Callable[[JSONResponse], str]) -> Response:
    """A create's answer in the form the client's `Prefer: return=` asks for (FHIR R4 http.html#ops), saying so
    in Preference-Applied: `minimal` no body, `OperationOutcome` an outcome whose diagnostics are `done(response)`,
    `representation` (the default) as it is."""
    chosen = preferred_return(prefer)
    if chosen is None or response.status_code not in (200, 201):
        return response
    response.headers["Preference-Applied"] = f"return={chosen}"
    if chosen == "representation":
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in KEPT_HEADERS}
    if chosen == "minimal":
        return Response(status_code=response.status_code, headers=headers)
    body = outcome("informational", [(None, done(response))], severity="information")
    return JSONResponse(body, status_code=response.status_code, media_type=FHIR_JSON, headers=headers)


def not_allowed(diagnostics: str, allowed: list[str]) -> JSONResponse:
    response = outcome_response(405, "not-supported", [(None, diagnostics)])
    # HEAD wherever GET is: every service answers it as GET without the body (http.HeadAsGet).
    allowed = [m for method in allowed for m in ([method, "HEAD"] if method == "GET" else [method])]
    response.headers["Allow"] = ", ".join(allowed)  # RFC 9110 10.2.1: empty when no method is allowed
    return response


def undeclared_answer(service: str, resource_type: str, rest: str | None,
                      internal: dict[str, list[str]] | None = None) -> JSONResponse:  # fmt: skip
    """What `service` answers a request under /fhir that none of its routes takes: a 405 naming what the type
    supports (`Allow` the methods at that level), a 404 naming the types served at the base, or, for a type
    another service serves, a 404 saying so. `internal`: types the service serves on its own port only, not at
    the public base. The type sent is not echoed (it may be any text)."""
    types = declared()
    summary = "; ".join(f"{kind} ({', '.join(codes)})" for kind, codes in types.items())
    if resource_type == "metadata":  # the ingress routes [base]/metadata to intake
        if service == "intake":
            return not_allowed("the CapabilityStatement is read with GET [base]/metadata", ["GET"])
        return outcome_response(
            404, "not-found", [(None, "the CapabilityStatement is served by intake: GET [base]/metadata")]
        )
    own = {**{t: c for t, c in types.items() if SERVED_BY[t] == service}, **(internal or {})}
    if resource_type not in own:
        if resource_type in types:
            return outcome_response(
                404,
                "not-found",
                [(None, f"{resource_type} is served by the {SERVED_BY[resource_type]} service at this base "
                        "behind the ingress; see GET [base]/metadata")],
            )  # fmt: skip
        return outcome_response(
            404, "not-found", [(None, f"no resource type of this name is served here; served: {summary} "
                                      "and the transaction (POST [base]); see GET [base]/metadata")]
        )  # fmt: skip
    level = (
        "[base]/{type}" if rest is None
        else "[base]/{type}/{id}" if "/" not in rest
        else "[base]/{type}/{id}/_history/{vid}" if len(rest.split("/")) == 3 and rest.split("/")[1] == "_history"
        else None
    )  # fmt: skip
    codes = own[resource_type]
    allowed = sorted({INTERACTIONS[c][0] for c in codes if INTERACTIONS[c][1] == level})
    if "search-type" in codes and rest == "_search":
        allowed = ["POST"]
    served = ", ".join(f"{c} ({' '.join(INTERACTIONS[c])})" for c in codes).replace("{type}", resource_type)
    where = (
        f"on the {service} service's own port only (internal: not at the public base)"
        if resource_type in (internal or {})
        else "here"
    )
    if "search-type" in codes:
        served += f" and POST [base]/{resource_type}/_search"
    return not_allowed(
        f"{resource_type} supports {served} {where}, nothing else; see GET [base]/metadata", allowed
    )


def undeclared_router(service: str, internal: dict[str, list[str]] | None = None) -> APIRouter:
    """The route answering, for `service`, what the CapabilityStatement does not declare (undeclared_answer).
    Include it under /fhir after the service's own FHIR routes: only requests none of them takes arrive here.
    A path with a trailing slash is sent to the one without (a relative Location: never built from the Host
    header)."""
    router = APIRouter(tags=["fhir"])  # its paths are under the FHIR base: include it with prefix="/fhir"

    @router.api_route("/{resource_type}", methods=EVERY_METHOD, include_in_schema=False)
    @router.api_route("/{resource_type}/{rest:path}", methods=EVERY_METHOD, include_in_schema=False)
    def undeclared(request: Request, resource_type: str, rest: str | None = None) -> Response:
        if request.url.path.endswith("/"):
            query = f"?{request.url.query}" if request.url.query else ""
            return Response(status_code=307, headers={"Location": request.url.path.rstrip("/") + query})
        return undeclared_answer(service, resource_type, rest, internal)

    return router


class FhirJsonResponse(JSONResponse):
    """A FHIR resource as JSON; a route's `response_class` so its document declares application/fhir+json."""

    media_type = "application/fhir+json"


def fhir_resource_answer(resource_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI `responses` entry for a 200 that is one FHIR resource of `resource_type`."""
    schema = {
        "type": "object",
        "description": f"a FHIR R4 {resource_type} (https://hl7.org/fhir/R4/{resource_type.lower()}.html)",
        "properties": {"resourceType": {"type": "string", "enum": [resource_type]}},
        "required": ["resourceType"],
    }
    return {200: {"description": description, "content": {"application/fhir+json": {"schema": schema}}}}
