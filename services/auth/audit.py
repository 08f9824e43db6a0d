"""The audit log: who read or wrote which case's PHI, when, why, and whether it was allowed.

Each entry is committed in its own transaction, so a denied or failed attempt is kept even when the
request's own work is rolled back. PostgreSQL refuses UPDATE, DELETE and TRUNCATE on the table
(migrations 0001 and 0003), and every entry carries the hash of the one before it (`audit_chain`), so a
change made around the triggers is still found by `secondopinion audit verify`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.auth.audit_chain import GENESIS, entry_hash
from services.auth.models import AuditEvent

# One writer at a time extends the chain (a transaction-scoped PostgreSQL advisory lock).
CHAIN_LOCK = 0x5EC0_A0D1


def record(
    engine: Engine,
    *,
    actor: str,
    partner_id: str | None,
    role: str | None,
    service: str,
    action: str,
    resource: str,
    outcome: str,
    case_id: str | None = None,
    purpose: str = "TREAT",
    detail: str = "",
) -> None:
    with Session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})
        last = session.exec(select(AuditEvent.row_hash).order_by(col(AuditEvent.id).desc()).limit(1)).first()
        event = AuditEvent(
            actor=actor,
            partner_id=partner_id,
            role=role,
            service=service,
            action=action,
            resource=resource,
            case_id=case_id,
            outcome=outcome,
            purpose=purpose,
            detail=detail[:500],
            prev_hash=last or GENESIS,
        )
        event.row_hash = entry_hash(event)
        session.add(event)
        session.commit()


def entries(
    engine: Engine,
    *,
    case_id: str | None = None,
    partner_id: str | None = None,
    since: datetime | None = None,
    limit: int = 500,
) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(col(AuditEvent.id)).limit(limit)
    if case_id is not None:
        query = query.where(AuditEvent.case_id == case_id)
    if partner_id is not None:
        query = query.where(AuditEvent.partner_id == partner_id)
    if since is not None:
        query = query.where(col(AuditEvent.at) >= since)
    with Session(engine) as session:
        return list(session.exec(query).all())
