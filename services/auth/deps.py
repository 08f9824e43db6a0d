"""FastAPI dependencies every service uses: `Caller` (Bearer API key or SMART access token) and
`require_role(...)`.

A SMART access token (services.auth.smart) acts as its client's partner, with the role `partner`, and only
within its scopes: a request its scopes do not cover is a 403 naming the scope it needs
(services.auth.smart_scopes). An API key has no scopes: it keeps doing all its role may.

@router.get("/v1/things/{id}")
def get_thing(id: str, caller: Caller) -> ...: ...

@router.post("/v1/admin", dependencies=[Depends(require_role(Role.OPERATIONS))])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from services.auth import audit, signed_links, smart, smart_scopes
from services.auth.keys import key_id_of, matches
from services.auth.models import ApiKey, Role, SmartAccessToken, SmartClient
from services.auth.rate_limit import (
    RateLimiter,
    get_image_rate_limiter,
    get_rate_limiter,
    reads_image_frames,
    retry_after,
)
from services.common.db import get_engine
from services.common.http import is_head

# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` one in the thread pool, a hop
# each, and a POST /v1/cases resolved seven of them before its own work began.


async def auth_engine() -> Engine:
    return get_engine("auth")


AuthEngine = Annotated[Engine, Depends(auth_engine)]


async def rate_limiter() -> RateLimiter:
    return get_rate_limiter()


async def image_rate_limiter() -> RateLimiter:
    return get_image_rate_limiter()


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer so_<key id>_<secret>`, from `secondopinion partner create`; or "
    "`Bearer sat_…`, an access token from `POST /auth/token` (SMART Backend Services).",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its role, for a partner key the one partner it may see, and for a
    specialist key the one specialist it acts as."""

    key_id: str
    role: Role
    partner_id: str | None
    specialist_id: str | None = None
    client_id: str | None = None  # a SMART client's access token
    scopes: str | None = None  # its granted scopes; None for an API key (no scope limits)
    via_link: bool = False  # the request carried a link signed for this key, not the key (signed_links)

    def sees(self, partner_id: str) -> bool:
        """Whether this key may see the partner's own data: operations all, a partner itself, a specialist
        none (specialists reach a case through its review, see services.auth.tenancy)."""
        return self.role == Role.OPERATIONS or (self.role == Role.PARTNER and partner_id == self.partner_id)

    @property
    def actor(self) -> str:
        return f"client:{self.client_id}" if self.client_id else f"key:{self.key_id}"


def service_of(request: Request) -> str:
    return str(request.app.title).removeprefix("secondopinion ")


def audit_caller(
    request: Request,
    engine: Engine,
    caller: Principal,
    *,
    resource: str,
    outcome: str,
    action: str | None = None,
    case_id: str | None = None,
    detail: str = "",
    purpose: str = "TREAT",
) -> None:
    """An audit entry for what `caller` did or tried in this request: who, their partner and role, and the
    service come from the key and the request; `action` defaults to the HTTP method. A HEAD that succeeded
    handed nothing out (headers only): no entry; its refusal is one."""
    if outcome == "success" and is_head(request):
        return
    audit.record(
        engine,
        **caller_entry(
            request,
            caller,
            resource=resource,
            outcome=outcome,
            action=action,
            case_id=case_id,
            detail=detail,
            purpose=purpose,
        ),
    )


def caller_entry(
    request: Request,
    caller: Principal,
    *,
    resource: str,
    outcome: str,
    action: str | None = None,
    case_id: str | None = None,
    detail: str = "",
    purpose: str = "TREAT",
) -> audit.EntryFields:
    """What an entry for `caller`'s request says (see audit_caller); a read through a signed link says so."""
    if caller.via_link:
        detail = f"via signed link; {detail}" if detail else "via signed link"
    return audit.EntryFields(
        actor=caller.actor,
        partner_id=caller.partner_id,
        role=caller.role.value,
        service=service_of(request),
        action=action or request.method.lower(),
        resource=resource,
        case_id=case_id,
        outcome=outcome,
        purpose=purpose,
        detail=detail,
        network_address=client_address(request),
    )


def client_address(request: Request) -> str | None:
    """The caller's IP address as this service saw it (behind the ingress: what uvicorn's proxy headers say)."""
    return request.client.host[:64] if request.client else None


def _deny(
    request: Request,
    engine: Engine,
    actor: str,
    detail: str,
    *,
    token: bool = False,
    partner_id: str | None = None,
) -> HTTPException:
    audit.record(
        engine,
        actor=actor,
        partner_id=partner_id,
        role=None,
        service=service_of(request),
        action=request.method.lower(),
        resource=request.url.path[:100],
        outcome="denied",
        detail=detail,
        network_address=client_address(request),
    )
    # RFC 6750 §3.1: a token that expired or was revoked is `invalid_token`; an API key keeps plain `Bearer`.
    challenge = 'Bearer error="invalid_token", error_description="' + detail.replace('"', "'") + '"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge if token else "Bearer"}
    )


def authenticate(
    request: Request,
    engine: AuthEngine,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    limiter: Annotated[RateLimiter, Depends(rate_limiter)],
    image_limiter: Annotated[RateLimiter, Depends(image_rate_limiter)],
) -> Principal:
    if credentials is None and signed_links.carries_link(request.url.query):
        return _link_principal(request, engine, limiter, image_limiter)
    if credentials is None:
        raise _deny(
            request,
            engine,
            "anonymous",
            "an API key is required: send `Authorization: Bearer <key>` (see docs/partners.md)",
        )
    if smart.is_access_token(credentials.credentials):
        return _token_principal(request, engine, credentials.credentials, limiter, image_limiter)
    key_id = key_id_of(credentials.credentials)
    with Session(engine) as session:
        key = session.get(ApiKey, key_id) if key_id else None
    if key is None or not matches(credentials.credentials, key.key_hash):
        raise _deny(request, engine, "anonymous", "the API key is not valid; check it or ask for a new one")
    if key.revoked_at is not None:
        raise _deny(request, engine, f"key:{key.id}", "the API key was revoked; use its replacement")
    _rate_limit(request, key.id, limiter, image_limiter)
    return Principal(
        key_id=key.id, role=Role(key.role), partner_id=key.partner_id, specialist_id=key.specialist_id
    )


LINK_STATE = "signed_link"  # request.state: the VerifiedLink a request was let in by (services.auth.routing)


def _link_principal(
    request: Request, engine: Engine, limiter: RateLimiter, image_limiter: RateLimiter
) -> Principal:
    """The key a signed link was issued for, acting as if it had sent this request: the link checked
    (signed_links), then the key as `authenticate` checks it (revoked: 401; its scopes; its rate buckets)."""
    try:
        if not request.url.path.startswith("/dicomweb/"):
            raise signed_links.LinkUnusable("signed links read DICOMweb only; send an API key")
        link = signed_links.verify(
            request.method, request.url.path, request.url.query, signed_links.get_link_settings()
        )
    except signed_links.LinkRefused as exc:
        # An expired link's key is known (its signature held): an API key as `key:<id>`, a token as `token:<id>`.
        actor = (exc.kid if exc.kid.startswith("token:") else f"key:{exc.kid}") if exc.kid else "anonymous"
        denied = _deny(request, engine, actor, exc.detail)
        if exc.status == status.HTTP_403_FORBIDDEN:
            raise HTTPException(status.HTTP_403_FORBIDDEN, exc.detail) from None
        raise denied from None
    setattr(request.state, LINK_STATE, link)
    if link.kid.startswith("token:"):
        caller = _linked_token(request, engine, link.kid.removeprefix("token:"))
    else:
        with Session(engine) as session:
            key = session.get(ApiKey, link.kid)
        if key is None or key.revoked_at is not None:
            raise _deny(
                request,
                engine,
                f"key:{link.kid}",
                "the key this signed link was issued for was revoked; ask for a new link",
            )
        caller = Principal(
            key_id=key.id,
            role=Role(key.role),
            partner_id=key.partner_id,
            specialist_id=key.specialist_id,
            via_link=True,
        )
    _rate_limit(request, caller.actor if caller.client_id else caller.key_id, limiter, image_limiter)
    return caller


def _linked_token(request: Request, engine: Engine, token_id: str) -> Principal:
    """The partner of the SMART access token a link was issued for, while the token is unexpired, its client
    not revoked, and its scopes cover the request."""
    with Session(engine) as session:
        token = session.get(SmartAccessToken, token_id)
        client = session.get(SmartClient, token.client_id) if token is not None else None
    if token is None or client is None:
        raise _deny(request, engine, "anonymous", "the access token this signed link was issued for is gone")
    expires = token.expires_at if token.expires_at.tzinfo else token.expires_at.replace(tzinfo=UTC)
    if expires <= datetime.now(UTC) or client.revoked_at is not None:
        raise _deny(
            request,
            engine,
            f"client:{client.id}",
            "the access token this signed link was issued for has expired or its client was revoked; ask for "
            "a new link",
            partner_id=client.partner_id,
        )
    if smart_scopes.permits(token.scope, request.method, request.url.path) is not None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "the access token this signed link was issued for may not read this"
        )
    return Principal(
        key_id=f"token:{token.id}",
        role=Role.PARTNER,
        partner_id=client.partner_id,
        client_id=client.id,
        scopes=token.scope,
        via_link=True,
    )


def _rate_limit(request: Request, bucket_id: str, limiter: RateLimiter, image_limiter: RateLimiter) -> None:
    bucket = image_limiter if reads_image_frames(request.method, request.url.path) else limiter
    wait = bucket.acquire(bucket_id)
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many requests with this key; retry after {retry_after(wait)} s",
            headers={"Retry-After": retry_after(wait)},
        )


def _token_principal(
    request: Request, engine: Engine, credential: str, limiter: RateLimiter, image_limiter: RateLimiter
) -> Principal:
    """The partner a SMART access token acts for, once it is known, unexpired, its client not revoked, and
    its scopes cover this request."""
    found = smart.find_token(engine, credential)
    if found is None:
        raise _deny(
            request,
            engine,
            "anonymous",
            "the access token is not valid; get a new one at POST /auth/token",
            token=True,
        )
    token, client = found
    actor = f"client:{client.id}"
    expires = token.expires_at if token.expires_at.tzinfo else token.expires_at.replace(tzinfo=UTC)
    if expires <= datetime.now(UTC):
        raise _deny(
            request,
            engine,
            actor,
            "the access token has expired; get a new one at POST /auth/token",
            token=True,
            partner_id=client.partner_id,
        )
    if client.revoked_at is not None:
        raise _deny(
            request,
            engine,
            actor,
            "the client of this access token was revoked; ask operations to register a new one",
            token=True,
            partner_id=client.partner_id,
        )
    _rate_limit(request, actor, limiter, image_limiter)
    caller = Principal(
        key_id=f"token:{token.id}",
        role=Role.PARTNER,
        partner_id=client.partner_id,
        client_id=client.id,
        scopes=token.scope,
    )
    missing = smart_scopes.permits(token.scope, request.method, request.url.path)
    if missing is not None:
        wanted = smart_scopes.name(missing)
        audit_caller(
            request,
            engine,
            caller,
            resource=request.url.path[:100],
            outcome="denied",
            detail=f"scope {wanted} not granted",
        )
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this needs the scope {wanted}, which your access token does not carry (it has: {token.scope}); "
            "ask for it at POST /auth/token, if your client is allowed it",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{wanted}"'},
        )
    return caller


Caller = Annotated[Principal, Depends(authenticate)]


def require_role(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets only `roles` through (403 otherwise, audited)."""

    async def check(request: Request, caller: Caller, engine: AuthEngine) -> Principal:
        if caller.role not in roles:
            await run_in_threadpool(
                audit_caller,
                request,
                engine,
                caller,
                resource=request.url.path[:100],
                outcome="denied",
                detail=f"role {caller.role.value} may not do this",
            )
            allowed = ", ".join(r.value for r in roles)
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this needs the role {allowed}; your key has {caller.role.value}"
            )
        return caller

    return check
