"""FHIR R4 search of intake's types: `GET [base]/Task?…`, `GET [base]/ServiceRequest?…` and their
`POST [base]/{type}/_search` (form body), each a `searchset` Bundle of the caller's cases only (services.common.
fhir_search reads the parameters and builds the Bundle).

Both types are the cases table read two ways (the order and its Task share the case's id), so every parameter is a
condition on an indexed column: the partner, then its order reference (uq_cases_partner_ref_system), the case id,
or the creation / last change (migration 0008); pages are newest first by (created_at, id), the cursor the last
row's pair. The values searched are never logged; the audit entry counts what was handed out.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import false, true
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col
from starlette.concurrency import run_in_threadpool

from services.auth import Principal, Role
from services.common.fhir import FHIR_JSON
from services.common.fhir_params import ORDER_PARAMS, TASK_INCLUDES, TASK_PARAMS, SearchParam
from services.common.fhir_search import (
    Search,
    SearchRefused,
    Token,
    all_of,
    date_condition,
    newest_first_page,
    read_search,
    searchset,
    sent_parameters,
)
from services.intake.api import AuditDep, CaseCaller, SessionDep, SettingsDep
from services.intake.fhir_service_request import fhir_base, to_service_request
from services.intake.fhir_task import CASE_SYSTEM, TASK_STATUS, to_task
from services.intake.handlers import UNKNOWN_SYSTEM
from services.intake.models import Case

PARTNER_SYSTEM = "urn:secondopinion:partner:"
TASK_STATUSES = {"draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress",
                 "on-hold", "failed", "completed", "entered-in-error"}  # fmt: skip
REQUEST_STATUSES = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}

Prefer = Annotated[
    str | None,
    Header(
        alias="Prefer",
        max_length=200,
        description="`handling=strict`: an unknown parameter is a 400 naming it (by default it is ignored, and "
        "the Bundle's self link lists only what was applied); FHIR R4 search.html#errors",
    ),
]


def order_reference(token: Token) -> ColumnElement[bool]:
    """The cases whose order reference the token names; one sent without a system is shown under the partner's
    namespace (fhir_task.order_identifier), so that system names it too."""
    same_value = col(Case.partner_case_ref) == token.code
    if token.system is None:
        return same_value
    unsystematic = col(Case.partner_case_ref_system).in_(["", UNKNOWN_SYSTEM])
    if token.system == "":
        return same_value & unsystematic
    named = same_value & col(Case.partner_case_ref_system).in_([token.system, UNKNOWN_SYSTEM])
    if token.system.startswith(PARTNER_SYSTEM):
        return named | (
            same_value & unsystematic & (col(Case.partner_id) == token.system[len(PARTNER_SYSTEM) :])
        )
    return named


def task_status(token: Token) -> ColumnElement[bool]:
    if token.code not in TASK_STATUSES:
        raise SearchRefused("status", f"must be a task-status code: {', '.join(sorted(TASK_STATUSES))}")
    statuses = [case for case, task in TASK_STATUS.items() if task == token.code]
    found = col(Case.status).in_(statuses) if statuses else false()
    if token.code == "in-progress":  # fhir_task.task_status: a case status not mapped is in progress
        return found | col(Case.status).not_in(list(TASK_STATUS))
    return found


def order_status(token: Token) -> ColumnElement[bool]:
    if token.code not in REQUEST_STATUSES:
        raise SearchRefused("status", f"must be a request-status code: {', '.join(sorted(REQUEST_STATUSES))}")
    return true() if token.code == "active" else false()


def by_id(ident: str | None) -> ColumnElement[bool]:
    return col(Case.id) == ident if ident is not None else false()


def case_identifier(token: Token) -> ColumnElement[bool]:
    return col(Case.id) == token.code if token.system in (None, CASE_SYSTEM) else false()


def conditions(search: Search, kind: str) -> list[ColumnElement[bool]]:
    found = all_of(search, "_id", lambda t: col(Case.id) == t.code)
    if kind == "Task":
        found += all_of(search, "identifier", case_identifier)
        found += all_of(search, "group-identifier", order_reference)
        found += all_of(search, "status", task_status)
        found += all_of(search, "focus", by_id) + all_of(search, "based-on", by_id)
        found += all_of(search, "_lastUpdated", lambda d: date_condition(col(Case.updated_at), d))
    else:
        found += all_of(search, "identifier", order_reference)
        found += all_of(search, "status", order_status)
        found += all_of(search, "_lastUpdated", lambda d: date_condition(col(Case.created_at), d))
    return found


def scope(caller: Principal) -> list[ColumnElement[bool]]:
    """A partner's key searches its own cases; operations every partner's (CaseCaller admits no other role)."""
    return [col(Case.partner_id) == caller.partner_id] if caller.role == Role.PARTNER else []


def run_search(
    session: Session, caller: Principal, search: Search, kind: str
) -> tuple[int, list[Case], str | None]:
    """(total, the page's cases, the next page's cursor)."""
    return newest_first_page(session, Case, [*scope(caller), *conditions(search, kind)], search)


async def answer_search(
    request: Request,
    kind: str,
    session: Session,
    caller: Principal,
    audit: Any,
    base: str,
    prefer: str | None,
) -> Response:
    declared, includes = (TASK_PARAMS, TASK_INCLUDES) if kind == "Task" else (ORDER_PARAMS, [])
    try:
        search = read_search(await sent_parameters(request), declared, prefer, includes)
        total, page, cursor = await run_in_threadpool(run_search, session, caller, search, kind)
    except SearchRefused as refused:
        return refused.answer()
    shown = to_task if kind == "Task" else to_service_request
    included = [to_service_request(case) for case in page] if search.includes else []
    # The entry is committed before the answer goes (a group commit): off the event loop, as the search is.
    await run_in_threadpool(
        audit, "list", "case", None, "success", f"FHIR {kind} search: {len(page)} of {total}"
    )
    bundle = searchset(base, kind, search, total, [shown(case) for case in page], cursor, included)
    return JSONResponse(bundle, media_type=FHIR_JSON)


SEARCHSET = {
    "description": "a `searchset` Bundle of your cases (`total` all matches; `link` self and next, absolute)",
    "content": {FHIR_JSON: {"example": {"resourceType": "Bundle", "type": "searchset", "total": 1}}},
}
SEARCH_ERROR = {
    "description": "a value that cannot be read, or with `Prefer: handling=strict` an unknown parameter: an "
    "OperationOutcome naming the parameter",
    "content": {FHIR_JSON: {"example": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "expression": ["_lastUpdated"], "diagnostics": "must be a date"}
    ]}}},
}  # fmt: skip
ANSWERS: dict[int | str, dict[str, Any]] = {200: SEARCHSET, 400: SEARCH_ERROR}


def query_doc(declared: dict[str, SearchParam], includes: list[str]) -> dict[str, Any]:
    params = [{"name": p.name, "in": "query", "required": False, "description": p.documentation,
               "schema": {"type": "string"}} for p in declared.values()]  # fmt: skip
    params.append({"name": "_count", "in": "query", "required": False, "schema": {"type": "integer"},
                   "description": "entries per page, 20 by default, at most 100"})  # fmt: skip
    if includes:
        params.append({"name": "_include", "in": "query", "required": False, "schema": {"type": "string"},
                       "description": f"also return the order: {' or '.join(includes)}"})  # fmt: skip
    return {"parameters": params}


FORM_DOC = {
    "requestBody": {
        "required": False,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "additionalProperties": {"type": "string"}},
                "example": {"identifier": "urn:oid:2.16.840.1.113883.19.5.1|REF-1001", "_count": "20"},
            }
        },
    }
}


async def search_tasks(
    request: Request, session: SessionDep, caller: CaseCaller, audit: AuditDep, settings: SettingsDep,
    prefer: Prefer = None,
) -> Response:  # fmt: skip
    """Your cases as Tasks, newest first: by your order (`focus`, `based-on`, `group-identifier`), status or
    last change; `_include=Task:focus` returns the orders too."""
    return await answer_search(request, "Task", session, caller, audit, fhir_base(settings), prefer)


async def search_orders(
    request: Request, session: SessionDep, caller: CaseCaller, audit: AuditDep, settings: SettingsDep,
    prefer: Prefer = None,
) -> Response:  # fmt: skip
    """Your orders as kept, newest first: by your order's identifier, status or when received."""
    return await answer_search(request, "ServiceRequest", session, caller, audit, fhir_base(settings), prefer)


def add_routes(router: APIRouter) -> None:
    """Add the searches to intake's FHIR router (before its route answering what is not declared)."""
    router.add_api_route(
        "/Task",
        search_tasks,
        methods=["GET"],
        responses=ANSWERS,
        openapi_extra=query_doc(TASK_PARAMS, TASK_INCLUDES),
    )
    router.add_api_route(
        "/Task/_search", search_tasks, methods=["POST"], responses=ANSWERS, openapi_extra=FORM_DOC
    )
    router.add_api_route(
        "/ServiceRequest",
        search_orders,
        methods=["GET"],
        responses=ANSWERS,
        openapi_extra=query_doc(ORDER_PARAMS, []),
    )
    router.add_api_route(
        "/ServiceRequest/_search", search_orders, methods=["POST"], responses=ANSWERS, openapi_extra=FORM_DOC
    )
