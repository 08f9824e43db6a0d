"""API keys and webhook secrets: generated here, shown once, stored only as a SHA-256 hash.

A key reads `so_<key id>_<secret>`: the key id finds the row, the hash of the whole key proves it. Keys
carry 256 bits of randomness, so a fast hash is enough (no password stretching is needed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

KEY_PATTERN = re.compile(r"^so_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def new_api_key() -> tuple[str, str]:
    """A fresh (key id, full key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"so_{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
