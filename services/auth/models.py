"""Auth tables: partners, their API keys (hashed), who may see which case, and the append-only audit log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import BigInteger, Column, Double, Text
from sqlmodel import Field, SQLModel

from services.common.db import utcnow

TABLES = (
    "partners",
    "api_keys",
    "audit_events",
    "case_owners",
    "case_reviewers",
    "audit_read_windows",
    "audit_forward_cursors",
    "smart_clients",
    "smart_access_tokens",
    "smart_assertion_ids",
    "rate_buckets",
)

# After a webhook secret rotation the previous secret stays valid this long, in and out.
SECRET_OVERLAP = timedelta(hours=24)


class Role(StrEnum):
    PARTNER = "partner"
    SPECIALIST = "specialist"
    OPERATIONS = "operations"


class Partner(SQLModel, table=True):
    __tablename__ = "partners"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    webhook_secret: str = Field(max_length=100, description="whsec_… shared with the partner for signatures")
    previous_webhook_secret: str | None = Field(default=None, max_length=100)
    secret_rotated_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)

    def webhook_secrets(self, now: datetime) -> list[str]:
        """The secrets valid now: the current one, and the previous one for a day after a rotation."""
        rotated = self.secret_rotated_at
        if rotated is not None and rotated.tzinfo is None:
            rotated = rotated.replace(tzinfo=UTC)
        overlap = self.previous_webhook_secret and rotated and now - rotated < SECRET_OVERLAP
        return [self.webhook_secret, *([self.previous_webhook_secret] if overlap else [])]  # type: ignore[list-item]


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=16, description="the public part of the key, shown in lists")
    partner_id: str | None = Field(default=None, foreign_key="partners.id", index=True, max_length=64)
    role: str = Field(max_length=20)
    specialist_id: str | None = Field(
        default=None,
        max_length=50,
        description="a specialist key acts as this one specialist of the directory",
    )
    key_hash: str = Field(
        max_length=64, description="SHA-256 of the whole key; the key itself is never stored"
    )
    label: str = Field(default="", max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    """One read or write of PHI, or one denied attempt. Rows are only ever inserted."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(max_length=100, description="api key id, or 'anonymous'")
    partner_id: str | None = Field(default=None, index=True, max_length=64)
    role: str | None = Field(default=None, max_length=20)
    service: str = Field(max_length=40)
    action: str = Field(max_length=20, description="create, read, update, delete, list, export")
    resource: str = Field(max_length=100, description="what was touched, e.g. case, case.document")
    case_id: str | None = Field(default=None, index=True, max_length=36)
    outcome: str = Field(max_length=20, description="success, denied, failed")
    purpose: str = Field(default="TREAT", max_length=20, description="HL7 PurposeOfUse code")
    detail: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    network_address: str | None = Field(
        default=None, max_length=64, description="the caller's IP address as the service saw it"
    )
    prev_hash: str | None = Field(default=None, max_length=64, description="row_hash of the entry before")
    row_hash: str | None = Field(
        default=None, max_length=64, description="SHA-256 over this entry and prev_hash"
    )


class CaseOwner(SQLModel, table=True):
    """The partner a case belongs to, as the case workflow told a service; tenancy checks read it."""

    __tablename__ = "case_owners"

    case_id: str = Field(primary_key=True, max_length=64)
    partner_id: str = Field(max_length=64, index=True)
    registered_at: datetime = Field(default_factory=utcnow)
    patient_id: str | None = Field(
        default=None,
        max_length=64,
        description="the referring facility's patient id (MRN): the Patient of the case's ATNA audit messages",
    )


class CaseReviewer(SQLModel, table=True):
    """A specialist the case is offered or assigned to now, or the author of its signed report: their key may
    read its records and its report. Revoked (the row deleted, the audit log says when and why) once they
    decline, the offer lapses, or the case is withdrawn from them (reassigned, cancelled) before they signed."""

    __tablename__ = "case_reviewers"

    case_id: str = Field(primary_key=True, max_length=64)
    specialist_id: str = Field(primary_key=True, max_length=50)
    registered_at: datetime = Field(default_factory=utcnow)


class ReadWindow(SQLModel, table=True):
    """A key's reads of one instance in one time window, written by whichever replica served the first of them:
    its audit entry covers them all (services.auth.read_windows). Expired windows are deleted; the entries stay."""

    __tablename__ = "audit_read_windows"

    key_id: str = Field(primary_key=True, max_length=16)
    case_id: str = Field(primary_key=True, max_length=64)
    instance_uid: str = Field(primary_key=True, max_length=64)
    window_start: int = Field(
        primary_key=True, index=True, sa_type=BigInteger, description="the window's start, epoch seconds"
    )


class ForwardCursor(SQLModel, table=True):
    """How far a feed of the audit log has been accepted by its receiver (the IHE ATNA audit record
    repository): the id of the last entry it took. Moved only after the receiver took the entries up to it."""

    __tablename__ = "audit_forward_cursors"

    feed: str = Field(primary_key=True, max_length=40)
    forwarded_through: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = Field(default_factory=utcnow)


class SmartClient(SQLModel, table=True):
    """A partner's system registered for SMART Backend Services: its public keys (a JWKS) sign the client
    assertions it trades for access tokens at `POST /auth/token`; `scopes` bounds what a token may carry."""

    __tablename__ = "smart_clients"

    id: str = Field(primary_key=True, max_length=64, description="the client_id (iss and sub of assertions)")
    partner_id: str = Field(foreign_key="partners.id", index=True, max_length=64)
    jwks: str = Field(
        sa_column=Column(Text, nullable=False),
        description="the JSON Web Key Set, as JSON: registered, or as last read from jwks_uri",
    )
    jwks_uri: str | None = Field(default=None, max_length=2000, description="where the client publishes it")
    jwks_fetched_at: datetime | None = None
    scopes: str = Field(max_length=2000, description="allowed scopes, space separated")
    label: str = Field(default="", max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class SmartAccessToken(SQLModel, table=True):
    """An access token issued at `POST /auth/token`: like an API key, only its SHA-256 is stored."""

    __tablename__ = "smart_access_tokens"

    id: str = Field(primary_key=True, max_length=16, description="the public part of the token")
    client_id: str = Field(foreign_key="smart_clients.id", index=True, max_length=64)
    token_hash: str = Field(max_length=64)
    scope: str = Field(max_length=2000, description="the scopes granted, space separated")
    expires_at: datetime = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow)


class SmartAssertionId(SQLModel, table=True):
    """A client assertion's `jti`, kept until the assertion expires: a second use of it is a replay."""

    __tablename__ = "smart_assertion_ids"

    client_id: str = Field(primary_key=True, max_length=64)
    jti: str = Field(primary_key=True, max_length=255)
    expires_at: datetime = Field(index=True)


class RateBucket(SQLModel, table=True):
    """A rate limit's token bucket for one key, shared by every process (services.auth.rate_limit): what is
    left and when it was last refilled, by the database's clock. A process takes a few tokens at a time."""

    __tablename__ = "rate_buckets"

    kind: str = Field(primary_key=True, max_length=16, description="api, images or token")
    key: str = Field(
        primary_key=True, max_length=100, description="an API key id, client:<id>, token:<address>"
    )
    tokens: float = Field(sa_type=Double)
    granted: int = Field(description="what the last grant handed out (returned by the same statement)")
    refilled_at: float = Field(sa_type=Double, description="epoch seconds, the database's clock")
