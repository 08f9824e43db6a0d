"""Case-scoped access for every service's routes: 404 for a case the key may not see, audited.

A router takes `dependencies=[Depends(case_scope("coverage"))]`: on every route with a `{case_id}` path
parameter the caller must be operations, the case's partner, or (where `specialists` allows, for reads
only) a specialist the case was offered to. Another partner's case answers exactly like a missing one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from fastapi import HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from services.auth import smart_scopes, tenancy
from services.auth.deps import AuthEngine, Caller, Principal, audit_caller, caller_entry
from services.auth.models import Role
from services.auth.read_windows import get_read_windows
from services.common.http import is_head

READ_METHODS = {"GET", "HEAD"}


def reads(request: Request) -> bool:
    """Whether a request reads: a GET or HEAD, or the POST that mints signed links to read an instance (it hands
    out reads of it, nothing is written; a specialist who may read the case may mint them)."""
    return request.method in READ_METHODS or (
        request.method == "POST" and smart_scopes.SIGNED_LINKS.match(request.url.path) is not None
    )


def record(
    request: Request,
    engine: AuthEngine,
    caller: Principal,
    resource: str,
    case_id: str | None,
    outcome: str,
    detail: str = "",
) -> None:
    audit_caller(
        request,
        engine,
        caller,
        action="read" if reads(request) else "write",
        resource=resource,
        case_id=case_id,
        outcome=outcome,
        detail=detail,
    )


def not_found(resource: str, case_id: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND, f"no {resource} of a case visible to your key; check the case id"
    )


def check_case(
    request: Request,
    engine: AuthEngine,
    caller: Principal,
    case_id: str,
    resource: str,
    *,
    specialists: bool,
    dicom: bool = False,
    uids: Mapping[str, str] | None = None,
) -> None:
    """Raise 404 (and audit the attempt) unless the caller may see the case; audit the access otherwise. A
    HEAD hands out no content: only its refusal is audited. `dicom`: a read names the study, series and
    instance of its URL (or `uids`, keyed study, series and sop, where a query names them: WADO-URI), and a
    key's reads of one instance are one entry per window (read_windows)."""
    role_ok = caller.role != Role.SPECIALIST or (specialists and reads(request))
    visible = role_ok and tenancy.may_see_case(
        engine, caller.role, caller.partner_id, caller.specialist_id, case_id
    )
    if not visible:
        record(request, engine, caller, resource, case_id, "denied", "the case is not visible to this key")
        raise not_found(resource, case_id)
    if is_head(request):
        return
    named = request.path_params if uids is None else uids
    detail = dicom_detail(named) if dicom else ""
    sop = named.get("sop") if dicom and request.method in READ_METHODS else None
    if sop is None:
        if request.method == "POST" and reads(request):
            detail += "; signed links to it issued"
        record(request, engine, caller, resource, case_id, "success", detail)
        return
    windows = get_read_windows()
    covered = (
        f"; this key's further reads of the instance in this {windows.seconds:g} s window are this entry"
    )
    entry = caller_entry(
        request,
        caller,
        action="read",
        resource=resource,
        case_id=case_id,
        outcome="success",
        detail=detail + covered,
    )
    # Reads through a signed link are their own accesses (the entry says so), not folded into the key's own:
    # their window is the key's id hashed, marked (the column holds 16 characters; the entry names the key).
    reader = (
        "~" + hashlib.sha256(caller.key_id.encode()).hexdigest()[:15] if caller.via_link else caller.key_id
    )
    windows.enter(engine, (reader, case_id, str(sop)), entry)


DICOM_LEVELS = (("study", "study"), ("series", "series"), ("sop", "instance"))


def dicom_detail(uids: Mapping[str, str]) -> str:
    """What a DICOMweb URL names (`study 1.2 series 1.2.3 instance 1.2.3.4`): UIDs, never patient data."""
    return " ".join(f"{name} {uids[p]}" for p, name in DICOM_LEVELS if p in uids)


def case_scope(resource: str, *, specialists: bool = False, dicom: bool = False) -> Callable[..., object]:
    """A router dependency: authenticate every route, and scope those with `{case_id}` to the caller
    (`dicom`: see check_case)."""

    async def scope(request: Request, caller: Caller, engine: AuthEngine) -> Principal:
        case_id = request.path_params.get("case_id")
        if case_id is not None:
            await run_in_threadpool(
                check_case,
                request,
                engine,
                caller,
                str(case_id),
                resource,
                specialists=specialists,
                dicom=dicom,
            )
        return caller

    return scope
