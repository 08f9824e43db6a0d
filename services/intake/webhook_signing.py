"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}` with the base64 secret after `whsec_`, sent as
`webhook-signature: v1,<base64> [v1,<base64> …]`. Several signatures (and several secrets on our side)
are accepted so a secret can rotate without dropped deliveries.

The `standardwebhooks` package does the same HMAC, but its verifier raises bare decoding errors on a
non-UTF-8 body or a malformed header and holds one secret; every rejection here says what was wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TOLERANCE_SECONDS = 5 * 60
# Standard Webhooks leaves the id's alphabet open; senders use prefixed ULIDs/UUIDs and base64 ("/+="). What
# can never be part of an id (white space, a comma, a line break) is refused.
WEBHOOK_ID = re.compile(r"[A-Za-z0-9_.:/+=-]{1,255}")


class WebhookRejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class SignedHeaders:
    webhook_id: str
    timestamp: int
    signature: str


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()).decode()


def headers_for(secrets: Iterable[str], webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, webhook_id, timestamp, body) for s in secrets),
    }


def read_headers(headers: Mapping[str, str], now: float) -> SignedHeaders:
    values = {name: headers.get(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    for name, value in values.items():
        if not value:
            raise WebhookRejected(400, f"the {name} header is missing; sign per Standard Webhooks")
    webhook_id, raw_timestamp, signature = (str(v) for v in values.values())
    if not WEBHOOK_ID.fullmatch(webhook_id):
        raise WebhookRejected(400, "webhook-id must be 1-255 letters, digits or _.:/+=-")
    if not re.fullmatch(r"[0-9]{1,12}", raw_timestamp):  # str.isdigit() also passes "²", which int() refuses
        raise WebhookRejected(400, "webhook-timestamp must be integer seconds since the Unix epoch")
    timestamp = int(raw_timestamp)
    if timestamp < now - TOLERANCE_SECONDS:
        raise WebhookRejected(400, "webhook-timestamp is more than 5 minutes old; send a fresh delivery")
    if timestamp > now + TOLERANCE_SECONDS:
        raise WebhookRejected(400, "webhook-timestamp is more than 5 minutes ahead; check your clock")
    return SignedHeaders(webhook_id=webhook_id, timestamp=timestamp, signature=signature)


def verify(secrets: Iterable[str], signed: SignedHeaders, body: bytes) -> None:
    """Pass when any `v1` signature in the header matches any of `secrets`; otherwise 400/401."""
    candidates: list[bytes] = []
    for part in signed.signature.split():
        version, sep, encoded = part.partition(",")
        if not sep or not encoded:
            raise WebhookRejected(400, "webhook-signature must be space-separated `v1,<base64>` values")
        if version != "v1":
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except ValueError as exc:  # binascii.Error, or a non-ASCII string
            raise WebhookRejected(400, "a webhook-signature value is not base64") from exc
    if not candidates:
        raise WebhookRejected(400, "webhook-signature carries no v1 signature")
    for secret in secrets:
        expected = base64.b64decode(sign(secret, signed.webhook_id, signed.timestamp, body).split(",", 1)[1])
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return
    raise WebhookRejected(401, "no signature matches the partner's webhook secret; nothing was processed")
