"""SMART Backend Services (HL7 SMART App Launch 2.x): registered clients, their signed assertions, access tokens.

A partner's system is registered with its public keys (a JWKS) and the scopes it may ask for. It signs a
client assertion (RFC 7523: iss = sub = client_id, aud = our token endpoint, exp at most 5 minutes ahead, a
jti used once, `kid` naming its key, RS384 or ES384) and trades it at `POST /auth/token` for an opaque access
token that lives 5 minutes. Like an API key, only the token's SHA-256 is stored.

TokenRefused          an RFC 6749 §5.2 error: `error` and `error_description`, answered 400
  + invalid_request, unsupported_grant_type, invalid_client, invalid_scope
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from services.auth import smart_scopes
from services.auth.keys import hash_key, matches
from services.auth.models import Partner, SmartAccessToken, SmartAssertionId, SmartClient
from services.auth.smart_jwks import JWKS_TTL, REFETCH_AFTER, JwksUnavailable

Fetch = Callable[[str], Any]  # a jwks_uri -> the JSON it answers (raises JwksUnavailable)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = {"RS384": "RSA", "ES384": "EC"}  # alg -> the key type it needs
ACCESS_TOKEN_SECONDS = 300
MAX_ASSERTION_LIFETIME = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=30)
TOKEN_PATTERN = re.compile(r"^sat_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


class TokenRefused(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.client: SmartClient | None = None  # the registered client the assertion named, once found


class ClientInvalid(ValueError):
    """A registration that cannot be stored; the message says what to fix."""


class PartnerMissing(ClientInvalid):
    pass


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    scope: str
    expires_in: int


# Registration ---------------------------------------------------------------------------------------------


def checked_jwks(jwks: Any) -> str:
    """The JWKS as stored (JSON), after checking each key is a public RSA or EC P-384 key with a unique kid."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ClientInvalid('a JWKS is an object {"keys": [...]} with at least one public key')
    kids: set[str] = set()
    for n, key in enumerate(keys, 1):
        if not isinstance(key, dict):
            raise ClientInvalid(f"key {n} of the JWKS is not a JSON object")
        kid, kty = key.get("kid"), key.get("kty")
        if not isinstance(kid, str) or not kid or len(kid) > 200:
            raise ClientInvalid(f"key {n} of the JWKS has no kid; give each key a kid the assertions name")
        if kid in kids:
            raise ClientInvalid(f"two keys of the JWKS have the kid {kid!r}; kids must be unique")
        kids.add(kid)
        if any(member in key for member in PRIVATE_MEMBERS):
            raise ClientInvalid(
                f"key {kid!r} carries private key material; register only the public keys and keep the "
                "private key with the client"
            )
        if kty not in ("RSA", "EC") or (kty == "EC" and key.get("crv") != "P-384"):
            raise ClientInvalid(f"key {kid!r} is neither RSA nor EC P-384; sign with RS384 or ES384")
        try:
            jwt.PyJWK(key, algorithm="RS384" if kty == "RSA" else "ES384")
        except jwt.PyJWTError as exc:
            raise ClientInvalid(f"key {kid!r} cannot be read as a JWK ({type(exc).__name__})") from exc
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True)


def register_client(
    session: Session,
    partner_id: str,
    jwks: Any,
    scopes: str,
    label: str = "",
    client_id: str | None = None,
    jwks_uri: str | None = None,
    fetch: Fetch | None = None,
) -> SmartClient:
    """A new client of `partner_id` (caller commits), with its keys inline (`jwks`) or at `jwks_uri`, read
    now with `fetch` (services.auth.smart_jwks). Raises ClientInvalid naming what to fix."""
    if (jwks is None) == (jwks_uri is None):
        raise ClientInvalid("give the client's keys either inline (jwks) or as a jwks_uri, one of the two")
    if jwks_uri is not None:
        if fetch is None:
            raise ClientInvalid("a jwks_uri cannot be read here; register the keys inline")
        try:
            jwks = fetch(jwks_uri)
        except JwksUnavailable as exc:
            raise ClientInvalid(str(exc)) from exc
    if session.get(Partner, partner_id) is None:
        raise PartnerMissing(f"no partner {partner_id}; create it first (secondopinion partner create)")
    try:
        allowed = smart_scopes.parse_all(scopes)
    except smart_scopes.ScopeInvalid as exc:
        raise ClientInvalid(str(exc)) from exc
    if not allowed:
        raise ClientInvalid(
            "name at least one allowed scope, e.g. system/ServiceRequest.write system/Task.read"
        )
    if client_id is not None and not CLIENT_ID.match(client_id):
        raise ClientInvalid("a client id is 1-64 letters, digits, dots, dashes or underscores")
    if client_id is not None and session.get(SmartClient, client_id) is not None:
        raise ClientInvalid(f"client {client_id} exists already; choose another id")
    client = SmartClient(
        id=client_id or f"{partner_id[:40]}-{secrets.token_hex(6)}",
        partner_id=partner_id,
        jwks=checked_jwks(jwks),
        jwks_uri=jwks_uri,
        jwks_fetched_at=datetime.now(UTC) if jwks_uri else None,
        scopes=" ".join(dict.fromkeys(scopes.split())),
        label=label,
    )
    session.add(client)
    return client


def replace_keys(
    session: Session, client_id: str, jwks: Any, partner_id: str | None = None
) -> SmartClient | None:
    """Replace the client's JWKS (caller commits): to rotate, register the set with both keys, switch the
    client to the new key, then register the set without the old one. None when there is no such client."""
    client = session.get(SmartClient, client_id, with_for_update=True)
    if client is None or (partner_id is not None and client.partner_id != partner_id):
        return None
    client.jwks = checked_jwks(jwks)
    client.jwks_uri = client.jwks_fetched_at = None  # the keys are inline from now on
    session.add(client)
    return client


def revoke_client(session: Session, client_id: str, partner_id: str | None = None) -> bool:
    """Revoke a client (idempotent): its assertions are refused and its access tokens stop working at once."""
    client = session.get(SmartClient, client_id)
    if client is None or (partner_id is not None and client.partner_id != partner_id):
        return False
    if client.revoked_at is None:
        client.revoked_at = datetime.now(UTC)
        session.add(client)
    return True


# The token endpoint ---------------------------------------------------------------------------------------


def _claims_unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenRefused(
            "invalid_client", "client_assertion is not a signed JWT (header.payload.signature, base64url)"
        ) from exc
    return header, claims


def _find(jwks: str, kid: Any) -> dict[str, Any] | None:
    keys = json.loads(jwks)["keys"]
    return next((k for k in keys if k.get("kid") == kid), None) if isinstance(kid, str) else None


def _refreshed(engine: Engine, client: SmartClient, kid: Any, now: datetime, fetch: Fetch | None) -> str:
    """The client's key set: the one kept, or read again from its jwks_uri when it is older than JWKS_TTL,
    or lacks `kid` and was read more than REFETCH_AFTER ago. A failed read keeps the kept set."""
    fetched = client.jwks_fetched_at
    if client.jwks_uri is None or fetch is None or fetched is None:
        return client.jwks
    fetched = fetched if fetched.tzinfo else fetched.replace(tzinfo=UTC)
    stale = now - fetched > JWKS_TTL or (_find(client.jwks, kid) is None and now - fetched > REFETCH_AFTER)
    if not stale:
        return client.jwks
    try:
        jwks = checked_jwks(fetch(client.jwks_uri))
    except (JwksUnavailable, ClientInvalid) as exc:
        if _find(client.jwks, kid) is not None and now - fetched < 24 * JWKS_TTL:
            return client.jwks
        raise TokenRefused("invalid_client", f"the client's keys could not be read: {exc}") from exc
    with Session(engine) as session:
        stored = session.get(SmartClient, client.id)
        if stored is not None:
            stored.jwks, stored.jwks_fetched_at = jwks, now
            session.add(stored)
            session.commit()
    return jwks


def _key_for(client: SmartClient, kid: Any, alg: str, jwks: str) -> jwt.PyJWK:
    key = _find(jwks, kid)
    if key is None:
        raise TokenRefused(
            "invalid_client",
            f"no key with the assertion's kid is registered for client {client.id}; set kid to a key of the "
            "registered JWKS, or have operations register the new key",
        )
    if key.get("kty") != ALGORITHMS[alg] or key.get("alg", alg) != alg:
        raise TokenRefused(
            "invalid_client",
            f"the key {kid!r} is {key.get('kty')}, not a key for {alg}; sign with its algorithm",
        )
    return jwt.PyJWK(key, algorithm=alg)


def verify_assertion(
    engine: Engine, assertion: str, token_url: str, now: datetime, fetch: Fetch | None = None
) -> SmartClient:
    """The client that signed `assertion`, after checking it all; raises TokenRefused (invalid_client)."""
    header, unverified = _claims_unverified(assertion)
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise TokenRefused(
            "invalid_client", f"alg {str(alg)[:20]!r} is not accepted; sign the assertion with RS384 or ES384"
        )
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or unverified.get("sub") != client_id:
        raise TokenRefused("invalid_client", "iss and sub of the assertion must both be your client_id")
    with Session(engine) as session:
        client = session.get(SmartClient, client_id[:64])
    if client is None or client.id != client_id:
        raise TokenRefused("invalid_client", "no such client is registered; ask operations to register it")
    try:
        _verify(engine, client, assertion, header, token_url, now, fetch)
    except TokenRefused as exc:
        exc.client = client
        raise
    return client


def _verify(
    engine: Engine,
    client: SmartClient,
    assertion: str,
    header: dict[str, Any],
    token_url: str,
    now: datetime,
    fetch: Fetch | None,
) -> None:
    alg = str(header["alg"])
    if client.revoked_at is not None:
        raise TokenRefused("invalid_client", f"client {client.id} was revoked; ask operations for a new one")
    jku = header.get("jku")
    if jku is not None and jku != client.jwks_uri:
        # SMART Backend Services: a jku SHALL match the JWKS URL given at registration. Never fetched: the keys
        # are read only from the URL operations registered (the registered URL is not said to a caller whose
        # assertion is not verified yet).
        raise TokenRefused(
            "invalid_client",
            "the assertion's jku is not the JWKS URL registered for the client; leave jku out of the header or "
            "set it to that URL"
            if client.jwks_uri
            else "the client's keys are registered inline, not at a URL; leave jku out of the assertion's header",
        )
    key = _key_for(client, header.get("kid"), alg, _refreshed(engine, client, header.get("kid"), now, fetch))
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=token_url,
            issuer=client.id,
            leeway=CLOCK_SKEW,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenRefused(
            "invalid_client", "the assertion has expired; sign a new one (exp ≤ 5 min ahead)"
        ) from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenRefused("invalid_client", f"aud must be the token endpoint URL, {token_url}") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRefused("invalid_client", f"the assertion has no {exc.claim} claim; add it") from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenRefused(
            "invalid_client", "the assertion's signature does not verify with the registered key of that kid"
        ) from exc
    except jwt.PyJWTError as exc:
        raise TokenRefused("invalid_client", f"the assertion is not valid ({type(exc).__name__})") from exc
    expires = datetime.fromtimestamp(float(claims["exp"]), UTC)
    if expires > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
        raise TokenRefused("invalid_client", "exp is more than 5 minutes ahead; sign with exp ≤ now + 300 s")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= 255:
        raise TokenRefused(
            "invalid_client", "jti must be a string of 1-255 characters, new for each assertion"
        )
    _use_jti(engine, client.id, jti, expires, now)


def _use_jti(engine: Engine, client_id: str, jti: str, expires: datetime, now: datetime) -> None:
    """Remember the jti until its assertion expires; a second use is a replay."""
    with Session(engine) as session:
        session.execute(delete(SmartAssertionId).where(SmartAssertionId.expires_at < now - CLOCK_SKEW))  # type: ignore[arg-type]
        session.add(SmartAssertionId(client_id=client_id, jti=jti, expires_at=expires))
        try:
            session.commit()
        except IntegrityError as exc:
            raise TokenRefused(
                "invalid_client",
                "this jti was used already (a replayed assertion); sign a new one with a new jti",
            ) from exc


def issue_token(engine: Engine, client: SmartClient, requested: str, now: datetime) -> IssuedToken:
    """An access token carrying the requested scopes the client may have; raises TokenRefused (invalid_scope)."""
    if not requested.split():
        raise TokenRefused(
            "invalid_scope", "scope is required: e.g. system/ServiceRequest.write system/Task.read"
        )
    try:
        granted = smart_scopes.grant(requested, client.scopes)
    except smart_scopes.ScopeInvalid as exc:
        raise TokenRefused("invalid_scope", str(exc)) from exc
    if not granted:
        raise TokenRefused(
            "invalid_scope",
            f"none of the requested scopes is allowed for client {client.id}; it may ask for: {client.scopes}",
        )
    token_id = secrets.token_hex(6)
    token = f"sat_{token_id}_{secrets.token_urlsafe(32)}"
    with Session(engine) as session:
        session.execute(delete(SmartAccessToken).where(SmartAccessToken.expires_at < now - timedelta(days=1)))  # type: ignore[arg-type]
        session.add(
            SmartAccessToken(
                id=token_id,
                client_id=client.id,
                token_hash=hash_key(token),  # stored as API keys are: SHA-256 only
                scope=granted,
                expires_at=now + timedelta(seconds=ACCESS_TOKEN_SECONDS),
            )
        )
        session.commit()
    return IssuedToken(access_token=token, scope=granted, expires_in=ACCESS_TOKEN_SECONDS)


# Resource servers -----------------------------------------------------------------------------------------


def is_access_token(credential: str) -> bool:
    return credential.startswith("sat_")


def find_token(engine: Engine, credential: str) -> tuple[SmartAccessToken, SmartClient] | None:
    """The token and its client, whatever their state (the caller checks expiry and revocation); None when
    the credential is no token of ours."""
    match = TOKEN_PATTERN.match(credential)
    if match is None:
        return None
    with Session(engine) as session:
        token = session.get(SmartAccessToken, match.group(1))
        client = session.get(SmartClient, token.client_id) if token is not None else None
    if token is None or client is None or not matches(credential, token.token_hash):
        return None
    return token, client
