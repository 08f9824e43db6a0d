"""Partners and their keys: create, issue, revoke, rotate. Keys are returned once and never again."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session, col, select

from services.auth.keys import hash_key, new_api_key, new_webhook_secret
from services.auth.models import ApiKey, Partner, Role


@dataclass(frozen=True)
class PartnerCredentials:
    partner_id: str
    api_key: str
    webhook_secret: str


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    api_key: str
    role: Role
    partner_id: str | None
    specialist_id: str | None = None


def partner_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "partner"
    return f"{slug}-{secrets.token_hex(3)}"


PARTNER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SPECIALIST_ID = re.compile(r"^[A-Za-z0-9._-]{1,50}$")


class PartnerExists(ValueError):
    pass


def create_partner(session: Session, name: str, partner_id: str | None = None) -> PartnerCredentials:
    """A new partner with one `partner` key and a webhook secret (caller commits)."""
    if partner_id is not None:
        if not PARTNER_ID.match(partner_id):
            raise ValueError("a partner id is 1-63 lowercase letters, digits and dashes")
        if session.get(Partner, partner_id) is not None:
            raise PartnerExists(f"partner {partner_id} exists already; choose another id or rotate its key")
    partner = Partner(id=partner_id or partner_slug(name), name=name, webhook_secret=new_webhook_secret())
    session.add(partner)
    session.flush()
    key = issue_key(session, Role.PARTNER, partner.id)
    return PartnerCredentials(
        partner_id=partner.id, api_key=key.api_key, webhook_secret=partner.webhook_secret
    )


def issue_key(
    session: Session, role: Role, partner_id: str | None, label: str = "", specialist_id: str | None = None
) -> IssuedKey:
    """A new key: a `partner` key belongs to exactly one partner, a `specialist` key acts as exactly one
    specialist of the directory, an `operations` key to neither."""
    if (role == Role.PARTNER) != (partner_id is not None):
        raise ValueError("a partner key needs a partner_id; specialist and operations keys have none")
    if (role == Role.SPECIALIST) != (specialist_id is not None):
        raise ValueError("a specialist key needs a specialist_id (e.g. spec-gyn-1); other keys have none")
    if specialist_id is not None and not SPECIALIST_ID.match(specialist_id):
        raise ValueError("a specialist id is 1-50 letters, digits, dots, dashes or underscores")
    key_id, api_key = new_api_key()
    session.add(
        ApiKey(
            id=key_id,
            partner_id=partner_id,
            specialist_id=specialist_id,
            role=role.value,
            key_hash=hash_key(api_key),
            label=label,
        )
    )
    return IssuedKey(
        key_id=key_id, api_key=api_key, role=role, partner_id=partner_id, specialist_id=specialist_id
    )


def revoke_key(session: Session, key_id: str, partner_id: str | None = None) -> bool:
    """Revoke a key (idempotent); with `partner_id`, only that partner's key. False when there is none."""
    key = session.get(ApiKey, key_id)
    if key is None or (partner_id is not None and key.partner_id != partner_id):
        return False
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        session.add(key)
    return True


def rotate_key(session: Session, key_id: str, partner_id: str | None = None) -> IssuedKey | None:
    """Issue a replacement with the same role and partner, and revoke the old key. The old key is locked: of
    two rotations at once, the second finds it revoked (None), never a second replacement."""
    old = session.get(ApiKey, key_id, with_for_update=True)
    if old is None or old.revoked_at is not None or (partner_id is not None and old.partner_id != partner_id):
        return None
    new = issue_key(session, Role(old.role), old.partner_id, label=old.label, specialist_id=old.specialist_id)
    revoke_key(session, key_id)
    return new


def active_keys(session: Session, partner_id: str) -> list[ApiKey]:
    return list(
        session.exec(
            select(ApiKey)
            .where(ApiKey.partner_id == partner_id, col(ApiKey.revoked_at).is_(None))
            .order_by(col(ApiKey.created_at))
        ).all()
    )


def rotate_webhook_secret(session: Session, partner_id: str) -> str | None:
    """A new webhook secret; the previous one stays valid for a day (caller commits). The partner is locked:
    of two rotations at once, the second keeps the first's secret as the previous one, never loses it."""
    partner = session.get(Partner, partner_id, with_for_update=True)
    if partner is None:
        return None
    partner.previous_webhook_secret = partner.webhook_secret
    partner.webhook_secret = new_webhook_secret()
    partner.secret_rotated_at = datetime.now(UTC)
    session.add(partner)
    return partner.webhook_secret
