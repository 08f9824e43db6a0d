"""SMART Backend Services over HTTP, served by intake.

POST /auth/token                                       client_credentials with a private_key_jwt assertion
GET  /fhir/.well-known/smart-configuration             what a client discovers (SMART App Launch 2.x)
POST /v1/partners/{partner_id}/smart-clients           register a client with its JWKS (operations)
GET  /v1/partners/{partner_id}/smart-clients           the partner's clients (no keys are secret here)
PUT  /v1/partners/{partner_id}/smart-clients/{id}/jwks  replace its keys (rotation; operations)
DELETE /v1/partners/{partner_id}/smart-clients/{id}    revoke one: its tokens stop working at once
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from services.auth import audit, smart
from services.auth.api import ERRORS, Operations, _own_partner
from services.auth.deps import AuthEngine, Caller, client_address
from services.auth.models import SmartClient
from services.auth.rate_limit import RateLimiter, get_token_rate_limiter, retry_after
from services.auth.routing import AuthRoute
from services.auth.smart_jwks import fetch_jwks
from services.common.config import Settings, get_settings

log = structlog.get_logger(__name__)

SettingsDep = Annotated[Settings, Depends(get_settings)]
FORM = "application/x-www-form-urlencoded"
GRANT_TYPE = "client_credentials"
SCOPES_SUPPORTED = [
    "system/*.read",
    "system/*.write",
    "system/ServiceRequest.write",
    "system/ServiceRequest.read",
    "system/Task.read",
    "system/Subscription.read",
    "system/Subscription.write",
    "system/DiagnosticReport.read",
    "system/ImagingStudy.read",
    "system/ImagingStudy.write",
    "system/CoverageEligibilityRequest.write",
    "system/CoverageEligibilityResponse.read",
    "system/AuditEvent.read",
]


def token_endpoint(settings: Settings) -> str:
    """The token endpoint at our public base: also the `aud` every client assertion must carry."""
    return f"{settings.intake_url.rstrip('/')}/auth/token"


# The token endpoint ---------------------------------------------------------------------------------------

token_router = APIRouter(prefix="/auth", tags=["auth"])


class AccessToken(BaseModel):
    """RFC 6749 §5.1. Send it as `Authorization: Bearer <access_token>` until it expires, then get another."""

    access_token: str = Field(examples=["sat_0a1b2c3d4e5f_…"])
    token_type: str = Field(examples=["bearer"])
    expires_in: int = Field(examples=[300], description="seconds")
    scope: str = Field(examples=["system/ServiceRequest.write system/Task.read"])


class OAuthError(BaseModel):
    """RFC 6749 §5.2."""

    error: str = Field(
        description="invalid_request, invalid_client, unsupported_grant_type or invalid_scope",
        examples=["invalid_client"],
    )
    error_description: str = Field(examples=["aud must be the token endpoint URL, https://…/auth/token"])


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": AccessToken, "description": "an access token for 300 s"},
    400: {
        "model": OAuthError,
        "description": "the request, the assertion or the scope was refused; `error_description` says why",
        "x-own-body": True,  # the RFC 6749 body, not a problem (services.common.openapi)
        "content": {
            "application/json": {
                "example": {
                    "error": "invalid_client",
                    "error_description": "the assertion has expired; sign a new one (exp ≤ 5 min ahead)",
                }
            }
        },
    },
}
TOKEN_RESPONSES[429] = {
    "model": OAuthError,
    "description": "too many token requests from the caller's address (`Retry-After` says when to retry)",
    "x-own-body": True,
    "content": {
        "application/json": {
            "example": {
                "error": "invalid_request",
                "error_description": "too many token requests from this address: retry after …",
            }
        }
    },
}
TOKEN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            FORM: {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "scope", "client_assertion_type", "client_assertion"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": [GRANT_TYPE]},
                        "scope": {
                            "type": "string",
                            "example": "system/ServiceRequest.write system/Task.read",
                        },
                        "client_assertion_type": {"type": "string", "enum": [smart.ASSERTION_TYPE]},
                        "client_assertion": {
                            "type": "string",
                            "description": "a JWT signed RS384 or ES384 with a key of the registered JWKS",
                        },
                    },
                },
                "example": {
                    "grant_type": GRANT_TYPE,
                    "scope": "system/Task.read",
                    "client_assertion_type": smart.ASSERTION_TYPE,
                    "client_assertion": "eyJhbGciOiJSUzM4NCJ9.e30.c2ln",
                },
            }
        },
    }
}


def refused(error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=400, headers=NO_STORE)


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise smart.TokenRefused("invalid_request", f"send the parameters as {FORM} (UTF-8)") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise smart.TokenRefused("invalid_request", f"{name} is sent more than once; send it once")
        form[name] = value
    return form


def _exchange(
    engine: Any, form: dict[str, str], token_url: str, env: str
) -> tuple[SmartClient, smart.IssuedToken]:
    if form.get("grant_type") != GRANT_TYPE:
        raise smart.TokenRefused(
            "unsupported_grant_type", f"grant_type must be {GRANT_TYPE} (SMART Backend Services)"
        )
    if form.get("client_assertion_type") != smart.ASSERTION_TYPE:
        raise smart.TokenRefused("invalid_client", f"client_assertion_type must be {smart.ASSERTION_TYPE}")
    assertion = form.get("client_assertion") or ""
    if not assertion:
        raise smart.TokenRefused("invalid_client", "client_assertion is missing: send the signed JWT")
    now = datetime.now(UTC)
    client = smart.verify_assertion(engine, assertion, token_url, now, lambda url: fetch_jwks(url, env))
    try:
        return client, smart.issue_token(engine, client, form.get("scope", ""), now)
    except smart.TokenRefused as exc:
        exc.client = client
        raise


def _audit_token(engine: Any, client: SmartClient | None, outcome: str, detail: str) -> None:
    audit.record(
        engine,
        actor=f"client:{client.id}" if client else "anonymous",
        partner_id=client.partner_id if client else None,
        role="partner" if client else None,
        service="intake",
        action="token",
        resource="auth.token",
        outcome=outcome,
        purpose="HOPERAT",
        detail=detail,
    )


@token_router.post("/token", response_model=AccessToken, responses=TOKEN_RESPONSES, openapi_extra=TOKEN_BODY)
async def token(
    request: Request,
    engine: AuthEngine,
    settings: SettingsDep,
    limiter: Annotated[RateLimiter, Depends(get_token_rate_limiter)],
) -> JSONResponse:
    """SMART Backend Services: trade a signed client assertion (RFC 7523, `private_key_jwt`) for an access
    token of 300 s carrying the requested scopes the client is allowed. Errors are RFC 6749 §5.2 bodies."""
    # A grant from the shared bucket is a database round trip: off the event loop.
    wait = await run_in_threadpool(limiter.acquire, f"token:{client_address(request) or 'unknown'}")
    if wait:
        log.info("smart.token_rate_limited")
        return JSONResponse(
            {
                "error": "invalid_request",
                "error_description": "too many token requests from this address: retry after the seconds "
                "Retry-After gives, and reuse a token until it expires (300 s) instead of asking for one per "
                "request",
            },
            status_code=429,
            headers={**NO_STORE, "Retry-After": retry_after(wait)},
        )
    if (request.headers.get("content-type") or "").split(";")[0].strip().lower() != FORM:
        return refused("invalid_request", f"send the parameters as {FORM}")
    try:
        form = _form(await request.body())
        client, issued = await run_in_threadpool(
            _exchange, engine, form, token_endpoint(settings), settings.env
        )
    except smart.TokenRefused as exc:
        # Never the assertion or the token: what was refused and why, and the client if it was one of ours.
        log.info("smart.token_refused", error=exc.error, client_id=exc.client.id if exc.client else None)
        await run_in_threadpool(_audit_token, engine, exc.client, "denied", f"{exc.error}: {exc.description}")
        return refused(exc.error, exc.description)
    log.info("smart.token_issued", client_id=client.id, scope=issued.scope)
    await run_in_threadpool(_audit_token, engine, client, "success", f"scope {issued.scope}")
    return JSONResponse(
        {
            "access_token": issued.access_token,
            "token_type": "bearer",
            "expires_in": issued.expires_in,
            "scope": issued.scope,
        },
        headers=NO_STORE,
    )


# Discovery (served under /fhir by intake's FHIR router) -----------------------------------------------------


def smart_configuration(settings: Settings) -> dict[str, Any]:
    return {
        "token_endpoint": token_endpoint(settings),
        "grant_types_supported": [GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(smart.ALGORITHMS),
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }


SMART_CONFIGURATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "SMART App Launch 2.x discovery: the token endpoint and what it accepts",
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["token_endpoint", "capabilities"]},
                "example": {
                    "token_endpoint": "https://api.example.org/auth/token",
                    "grant_types_supported": [GRANT_TYPE],
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    "capabilities": ["client-confidential-asymmetric"],
                },
            }
        },
    }
}


def well_known(settings: SettingsDep) -> JSONResponse:
    """SMART configuration (no API key needed): where to get an access token and how to sign for it."""
    return JSONResponse(smart_configuration(settings))


# Registration (operations) -----------------------------------------------------------------------------------

clients_router = APIRouter(prefix="/v1/partners", tags=["partners"], route_class=AuthRoute)

JWKS_EXAMPLE: Any = {
    "keys": [{"kty": "EC", "crv": "P-384", "kid": "hospital-2026", "x": "…", "y": "…", "alg": "ES384"}]
}


class SmartClientCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"jwks": JWKS_EXAMPLE, "scopes": "system/ServiceRequest.write system/Task.read"}]
        },
    )

    jwks: dict[str, Any] | None = Field(
        default=None, description="the client's public keys, a JSON Web Key Set (RSA or EC P-384)"
    )
    jwks_uri: str | None = Field(
        default=None,
        max_length=2000,
        description="instead of jwks: where the client publishes its key set (HTTPS, a public address); "
        "read now and again when an assertion names a new kid",
    )
    scopes: str = Field(
        min_length=1, max_length=2000, description="the scopes it may ask for, space separated (system/…)"
    )
    label: str = Field(default="", max_length=100, description="e.g. the EHR instance (no names of people)")


class SmartClientPublic(BaseModel):
    client_id: str
    partner_id: str
    scopes: str
    label: str
    jwks_uri: str | None
    key_ids: list[str]
    token_endpoint: str
    created_at: datetime
    revoked_at: datetime | None


def _public(client: SmartClient, settings: Settings) -> SmartClientPublic:
    return SmartClientPublic(
        client_id=client.id,
        partner_id=client.partner_id,
        scopes=client.scopes,
        label=client.label,
        jwks_uri=client.jwks_uri,
        key_ids=[str(k.get("kid")) for k in json.loads(client.jwks)["keys"]],
        token_endpoint=token_endpoint(settings),
        created_at=client.created_at,
        revoked_at=client.revoked_at,
    )


@clients_router.post(
    "/{partner_id}/smart-clients", status_code=201, response_model=SmartClientPublic, responses=ERRORS
)
def register(
    partner_id: str, body: SmartClientCreate, _: Operations, engine: AuthEngine, settings: SettingsDep
) -> SmartClientPublic:
    """Register a SMART Backend Services client of the partner (operations only), with its public keys
    (`jwks`, or a `jwks_uri` read now) and the scopes it may ask for. The answer's client_id is the iss and sub of its assertions."""
    with Session(engine) as session:
        try:
            client = smart.register_client(
                session,
                partner_id,
                body.jwks,
                body.scopes,
                body.label,
                jwks_uri=body.jwks_uri,
                fetch=lambda url: fetch_jwks(url, settings.env),
            )
        except smart.PartnerMissing as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        except smart.ClientInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
        session.commit()
        session.refresh(client)
        return _public(client, settings)


@clients_router.get("/{partner_id}/smart-clients", response_model=list[SmartClientPublic], responses=ERRORS)
def list_clients(
    partner_id: str, request: Request, caller: Caller, engine: AuthEngine, settings: SettingsDep
) -> list[SmartClientPublic]:
    """The partner's SMART clients, revoked ones too."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        found = session.exec(
            select(SmartClient)
            .where(SmartClient.partner_id == partner.id)
            .order_by(col(SmartClient.created_at))
        ).all()
    return [_public(c, settings) for c in found]


class Jwks(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [JWKS_EXAMPLE]})

    keys: list[dict[str, Any]] = Field(description="public keys: RSA, or EC P-384, each with a kid")


@clients_router.put(
    "/{partner_id}/smart-clients/{client_id}/jwks", response_model=SmartClientPublic, responses=ERRORS
)
def replace_keys(
    partner_id: str, client_id: str, body: Jwks, _: Operations, engine: AuthEngine, settings: SettingsDep
) -> SmartClientPublic:
    """Replace the client's public keys (operations only; a client with a jwks_uri has inline keys from then
    on). To rotate without downtime: register the set
    with the old and the new key, let the client sign with the new one, then register the set without the
    old one. Assertions are checked against the keys registered when they arrive."""
    with Session(engine) as session:
        try:
            client = smart.replace_keys(session, client_id, body.model_dump(), partner_id)
        except smart.ClientInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
        if client is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no such client of this partner; GET /v1/partners/{partner_id}/smart-clients lists them",
            )
        session.commit()
        session.refresh(client)
        return _public(client, settings)


@clients_router.delete("/{partner_id}/smart-clients/{client_id}", status_code=204, responses=ERRORS)
def revoke(partner_id: str, client_id: str, request: Request, caller: Caller, engine: AuthEngine) -> Response:
    """Revoke a client (idempotent): its assertions are refused and its access tokens stop working at once."""
    partner = _own_partner(request, caller, engine, partner_id)
    with Session(engine) as session:
        if not smart.revoke_client(session, client_id, partner.id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no such client of this partner; GET /v1/partners/{partner_id}/smart-clients lists them",
            )
        session.commit()
    return Response(status_code=204)


__all__ = ["clients_router", "smart_configuration", "token_router", "well_known"]
