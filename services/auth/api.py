"""Partner self-service (`/v1/partners`): keys are shown once at creation and never again."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from contracts.models import UtcDatetime
from services.auth import audit, fhir_audit
from services.auth.deps import AuthEngine, Caller, Principal, audit_caller, require_role
from services.auth.models import Partner, Role
from services.auth.partners import (
    active_keys,
    create_partner,
    issue_key,
    revoke_key,
    rotate_key,
    rotate_webhook_secret,
)
from services.auth.problems import AUTH_ERRORS, problem_response
from services.auth.routing import AuthRoute
from services.common.config import Settings, get_settings

router = APIRouter(prefix="/v1/partners", tags=["partners"], route_class=AuthRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: problem_response(404, "No such partner or key (or not yours)", "no partner x visible to this key"),
    422: problem_response(422, "The request is invalid; `errors` names each field", "fix the fields listed"),
}


class PartnerCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "Bayview Women's Clinic"}]}
    )

    name: str = Field(min_length=1, max_length=200, examples=["Bayview Women's Clinic"])


class PartnerCredentials(BaseModel):
    """Shown once: store the key and the webhook secret now, they cannot be read again."""

    partner_id: str
    api_key: str
    webhook_secret: str


class KeyPublic(BaseModel):
    key_id: str
    role: str
    created_at: datetime


class NewKey(BaseModel):
    """Shown once."""

    key_id: str
    api_key: str


class PartnerPublic(BaseModel):
    partner_id: str
    name: str
    keys: list[KeyPublic]


Operations = Annotated[Principal, Depends(require_role(Role.OPERATIONS))]


def _own_partner(request: Request, caller: Principal, engine: AuthEngine, partner_id: str) -> Partner:
    with Session(engine) as session:
        partner = session.get(Partner, partner_id)
    if partner is None or not caller.sees(partner_id):
        if partner is not None:
            audit_caller(
                request, engine, caller, resource="partner", outcome="denied", detail="another partner's keys"
            )
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, "no such partner visible to this key; check the partner id"
        )
    return partner


@router.post("", status_code=201, response_model=PartnerCredentials, responses=ERRORS)
def create(body: PartnerCreate, _: Operations, engine: AuthEngine) -> PartnerCredentials:
    """Register a partner (operations only); the answer carries its first API key and webhook secret."""
    with Session(engine) as session:
        credentials = create_partner(session, body.name)
        session.commit()
    return PartnerCredentials(
        partner_id=credentials.partner_id,
        api_key=credentials.api_key,
        webhook_secret=credentials.webhook_secret,
    )


@router.get("/{partner_id}", response_model=PartnerPublic, responses=ERRORS)
def get_partner(partner_id: str, request: Request, caller: Caller, engine: AuthEngine) -> PartnerPublic:
    """The partner and its active keys (ids only; a key is never shown again)."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        keys = active_keys(session, partner.id)
    return PartnerPublic(
        partner_id=partner.id,
        name=partner.name,
        keys=[KeyPublic(key_id=k.id, role=k.role, created_at=k.created_at) for k in keys],
    )


@router.post("/{partner_id}/keys", status_code=201, response_model=NewKey, responses=ERRORS)
def add_key(partner_id: str, request: Request, caller: Caller, engine: AuthEngine) -> NewKey:
    """A second key, e.g. to roll keys without downtime: deploy the new key, then revoke the old one."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        issued = issue_key(session, Role.PARTNER, partner.id)
        session.commit()
    return NewKey(key_id=issued.key_id, api_key=issued.api_key)


@router.post("/{partner_id}/keys/{key_id}/rotate", status_code=201, response_model=NewKey, responses=ERRORS)
def rotate(partner_id: str, key_id: str, request: Request, caller: Caller, engine: AuthEngine) -> NewKey:
    """Replace a key: the answer is the new key, the old one stops working at once."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        issued = rotate_key(session, key_id, partner.id)
        if issued is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no such active key of this partner; GET /v1/partners/{partner_id} lists them",
            )
        session.commit()
    return NewKey(key_id=issued.key_id, api_key=issued.api_key)


class WebhookSecret(BaseModel):
    """Shown once. The previous secret stays valid for 24 hours, for deliveries both ways."""

    webhook_secret: str


@router.post(
    "/{partner_id}/webhook-secret/rotate", status_code=201, response_model=WebhookSecret, responses=ERRORS
)
def rotate_secret(partner_id: str, request: Request, caller: Caller, engine: AuthEngine) -> WebhookSecret:
    """Replace the webhook secret. For 24 hours both secrets are accepted on inbound webhooks and outbound
    webhooks carry a signature with each, so either side can switch without dropped deliveries."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        secret = rotate_webhook_secret(session, partner.id)
        session.commit()
    return WebhookSecret(webhook_secret=str(secret))


@router.delete("/{partner_id}/keys/{key_id}", status_code=204, responses=ERRORS)
def revoke(partner_id: str, key_id: str, request: Request, caller: Caller, engine: AuthEngine) -> Response:
    """Revoke a key (idempotent)."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        if not revoke_key(session, key_id, partner.id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no such key of this partner; GET /v1/partners/{partner_id} lists them",
            )
        session.commit()
    return Response(status_code=204)


@router.get(
    "/{partner_id}/audit-events",
    responses={
        200: {
            "description": "a FHIR R4 Bundle (searchset) of AuditEvent",
            "content": {
                "application/fhir+json": {"example": {"resourceType": "Bundle", "type": "searchset"}}
            },
        },
        **ERRORS,
    },
)
def export_audit(
    partner_id: str,
    request: Request,
    caller: Caller,
    engine: AuthEngine,
    settings: Annotated[Settings, Depends(get_settings)],
    case_id: Annotated[str | None, Query(max_length=36)] = None,
    since: Annotated[
        UtcDatetime | None, Query(description="ISO 8601 (UTC if no offset); entries at or after")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    after: Annotated[
        int | None,
        Query(ge=0, le=2**63 - 1, description="the page after this entry: follow the Bundle's `next` link"),
    ] = None,
) -> JSONResponse:
    """Who read or wrote this partner's cases, as FHIR AuditEvent (the oldest first), `limit` a page: `total`
    counts them all, `link` `next` (absolute) reads the next page."""
    _own_partner(request, caller, engine, partner_id)
    entries = audit.entries(
        engine, partner_id=partner_id, case_id=case_id, since=since, limit=limit, after=after
    )
    total = audit.count(engine, partner_id=partner_id, case_id=case_id, since=since)
    audit_caller(
        request,
        engine,
        caller,
        action="export",
        resource="audit",
        case_id=case_id,
        outcome="success",
        purpose="HOPERAT",
    )
    # Absolute, at our public base (never built from the Host header, which the client sets as it likes).
    url = f"{settings.intake_url.rstrip('/')}/v1/partners/{partner_id}/audit-events"
    asked = {"case_id": case_id, "since": since.isoformat() if since else None, "limit": limit}
    page = {k: v for k, v in asked.items() if v is not None}
    links = {"self": f"{url}?{urlencode(page | ({'after': after} if after is not None else {}))}"}
    if len(entries) == limit:  # perhaps more: the next page starts after this one's last entry
        links["next"] = f"{url}?{urlencode(page | {'after': entries[-1].id})}"
    return JSONResponse(fhir_audit.bundle(entries, total, links), media_type="application/fhir+json")
