"""Signed links: a short-lived URL that reads one DICOMweb resource without an `Authorization` header, for a
browser `<img src>` / `<video src>` or a WADO-URI link placed in an EHR (like an S3 presigned URL).

A link is issued for a key (`POST …/instances/{sop}/links`, services.records.links) and carries, in its query:

| parameter | what |
|---|---|
| `exp` | when it expires, Unix seconds (at most `RECORDS_LINK_MAX_SECONDS` after issue, 5 min by default) |
| `kid` | the key it was issued for (an API key's id, or `token:<id>` for a SMART access token) |
| `ph` | SHA-256 of the path it is for (base64url), so a link used on another path is told so |
| `sig` | HMAC-SHA256 (key: `RECORDS_LINK_SECRET`) over `GET`, the exact path and the canonical query |

The canonical query is every parameter but `sig`, sorted by name then value, each percent-encoded (RFC 3986
unreserved characters kept): the whole query is signed as issued, so a parameter added, removed or changed
(a viewport, a window, `accept`, another instance's UID in a WADO-URI link) breaks the signature. Headers are
not signed: an `Accept` header, or a `Range` as a `<video>` element seeks, reads the same instance.

At use (services.auth.deps.authenticate, when no `Authorization` header is sent) the link is checked here, then
its key is checked as if it had sent the request (revoked: 401; the case scope, audit and image rate bucket of
that key). `RECORDS_LINK_PREVIOUS_SECRET` is accepted too, so the secret can be rotated without breaking links
already handed out. Refusals:

```
LinkRefused
  + LinkUnusable      (401: incomplete or malformed, expired, not a GET)
  + LinkDoesNotMatch  (403: for another path, or the signature does not match the path and query)
```
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_LINK_SECRET = "dev-only-link-secret-not-for-production"  # noqa: S105 - refused with ENV=prod
SIGNED = "sig"
LINK_PARAMETERS = ("exp", "kid", "ph", SIGNED)
READ_METHODS = ("GET", "HEAD")  # a HEAD is the GET's headers: a link signs GET


class SignedLinkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_LINK_")

    # The HMAC key links are signed with; required (not the development one) with ENV=prod.
    secret: str = DEV_LINK_SECRET
    # The one before: links signed with it still verify until they expire (rotation).
    previous_secret: str | None = None
    # The longest a link lives; a caller may ask for less.
    max_seconds: int = Field(default=300, ge=1, le=86_400)

    def production_problems(self) -> list[str]:
        if self.secret == DEV_LINK_SECRET or len(self.secret) < 32:
            return ["RECORDS_LINK_SECRET must be set to a random secret of at least 32 characters"]
        return []


@lru_cache
def get_link_settings() -> SignedLinkSettings:
    return SignedLinkSettings()


class LinkRefused(Exception):
    status = 401

    def __init__(self, detail: str, kid: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.kid = kid  # the key of a link whose signature held (an expired one); None when unverified


class LinkUnusable(LinkRefused):
    status = 401


class LinkDoesNotMatch(LinkRefused):
    status = 403


@dataclass(frozen=True)
class VerifiedLink:
    kid: str
    expires: int  # Unix seconds

    def remaining(self, now: float | None = None) -> int:
        return max(0, self.expires - int(time.time() if now is None else now))


def carries_link(query: str) -> bool:
    """Whether a query is (or was cut from) a signed link's: it names a signature or a key."""
    return any(name in (SIGNED, "kid") for name, _ in parse_qsl(query, keep_blank_values=True))


def canonical_query(pairs: list[tuple[str, str]]) -> str:
    """`pairs` but `sig`, sorted by name then value, percent-encoded: the query a signature covers."""
    kept = sorted((name, value) for name, value in pairs if name != SIGNED)
    return "&".join(f"{quote(name, safe='-._~')}={quote(value, safe='-._~')}" for name, value in kept)


def path_hash(path: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.encode()).digest()).decode().rstrip("=")


def _signature(secret: str, path: str, canonical: str) -> str:
    message = f"GET\n{path}\n{canonical}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(
    path: str,
    params: dict[str, str],
    kid: str,
    expires: int,
    settings: SignedLinkSettings,
) -> str:
    """The query of a link to GET `path` with `params`, for `kid`, until `expires` (Unix seconds)."""
    pairs = [*params.items(), ("exp", str(expires)), ("kid", kid), ("ph", path_hash(path))]
    canonical = canonical_query(pairs)
    return f"{canonical}&{SIGNED}={_signature(settings.secret, path, canonical)}"


def verify(
    method: str, path: str, query: str, settings: SignedLinkSettings, now: float | None = None
) -> VerifiedLink:
    """The key and expiry of the link `path?query`, or LinkRefused saying what is wrong with it."""
    pairs = parse_qsl(query, keep_blank_values=True)
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name, []).append(value)
    if any(len(values.get(name, [])) != 1 for name in LINK_PARAMETERS):
        raise LinkUnusable(
            "the signed link is incomplete: it needs exactly one each of exp, kid, ph and sig; copy the whole "
            "link, or ask for a new one"
        )
    if method not in READ_METHODS:
        raise LinkUnusable("a signed link reads (GET); send an API key for anything else")
    if not hmac.compare_digest(values["ph"][0], path_hash(path)):
        raise LinkDoesNotMatch(
            "this signed link was issued for another path; use it on the URL it was issued with"
        )
    canonical = canonical_query(pairs)
    secrets = [settings.secret, *([settings.previous_secret] if settings.previous_secret else [])]
    given = values[SIGNED][0]
    if not any(hmac.compare_digest(given, _signature(s, path, canonical)) for s in secrets):
        raise LinkDoesNotMatch(
            "the signature does not match this link's path and query: it was changed (a parameter added, "
            "removed or altered) or cut short; ask for a new link with the parameters you need"
        )
    expires_text = values["exp"][0]
    if not expires_text.isdigit():  # signed, so only a link we issued wrongly gets here
        raise LinkUnusable("the signed link's exp is not a time; ask for a new link")
    expires = int(expires_text)
    if expires <= int(time.time() if now is None else now):
        raise LinkUnusable(
            "the signed link has expired; ask for a new one (links live minutes)", values["kid"][0]
        )
    return VerifiedLink(kid=values["kid"][0], expires=expires)
