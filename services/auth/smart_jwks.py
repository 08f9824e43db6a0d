"""A SMART client's JWKS read from its `jwks_uri`, under the outbound webhooks' SSRF rules.

The URL must be HTTPS to a public address (in development, ENV=dev, plain HTTP and loopback too); the
address is checked at every fetch and the fetch connects to the address checked (the name is not resolved
again), with the URL's host as Host and TLS server name. Redirects are not followed; the answer must be a
200 of at most 64 KiB, read within 10 s in all.

Fetched key sets are kept on the client (`jwks`, `jwks_fetched_at`) for JWKS_TTL; an assertion naming a kid
not in the kept set fetches again, at most once every REFETCH_AFTER, so assertions with made-up kids cannot
turn the token endpoint into a stream of requests to the partner.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import httpx

MAX_JWKS_BYTES = 64 * 1024
FETCH_SECONDS = 10.0
JWKS_TTL = timedelta(minutes=5)
REFETCH_AFTER = timedelta(seconds=30)


class JwksUnavailable(ValueError):
    """The key set could not be read from the jwks_uri; the message says why (never what was answered)."""


def check_jwks_uri(url: str, env: str) -> str:
    """The address the fetch may connect to; JwksUnavailable saying what is wrong with the URL."""
    # The outbound webhooks' rules (intake sends them; the token endpoint is intake's too).
    from services.intake.host_lookup import EndpointRefused
    from services.intake.webhooks_out import check_url

    try:
        return check_url(url, env)[0]
    except EndpointRefused as exc:
        raise JwksUnavailable(str(exc).replace("the endpoint", "the jwks_uri")) from exc


def fetch_jwks(url: str, env: str) -> Any:
    """The JSON the jwks_uri answers (checked by the caller as a JWKS)."""
    address = check_jwks_uri(url, env)
    target = httpx.URL(url)
    pinned = target.copy_with(host=address)
    headers = {"host": target.netloc.decode("ascii"), "accept": "application/json"}
    deadline = time.monotonic() + FETCH_SECONDS
    try:
        with (
            httpx.Client(timeout=FETCH_SECONDS, follow_redirects=False) as http,
            http.stream(
                "GET", pinned, headers=headers, extensions={"sni_hostname": target.raw_host.decode("ascii")}
            ) as answer,
        ):
            if answer.status_code != 200:
                raise JwksUnavailable(f"the jwks_uri answered HTTP {answer.status_code}; it must answer 200")
            body = b""
            for chunk in answer.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksUnavailable(f"the jwks_uri answered more than {MAX_JWKS_BYTES // 1024} KiB")
                if time.monotonic() > deadline:
                    raise JwksUnavailable(f"the jwks_uri did not answer within {FETCH_SECONDS:g} s")
    except httpx.HTTPError as exc:
        raise JwksUnavailable(f"the jwks_uri could not be read ({type(exc).__name__})") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise JwksUnavailable("the jwks_uri did not answer JSON") from exc
