"""The partner a route under `/v1/partners/{partner_id}/…` is about (its webhook endpoints, HL7 endpoints, HL7
senders): the partner's own keys and operations pass; another partner's key, or a specialist's, gets a 404 as if
there were no such partner, and the attempt is audited as denied (an ATNA Security Alert in the audit feed)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request, status

from services.auth import AuthEngine, Caller, Role
from services.auth.deps import audit_caller


def partner_scope(resource: str, what: str) -> Callable[..., None]:
    """The router dependency for routes about one partner's `what`, audited as `resource`."""

    def scope(partner_id: str, request: Request, caller: Caller, auth: AuthEngine) -> None:
        if caller.sees(partner_id) and caller.role != Role.SPECIALIST:
            return
        audit_caller(
            request, auth, caller, resource=resource, outcome="denied", detail=f"another partner's {what}"
        )
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no partner with this id is visible to this key")

    return scope
