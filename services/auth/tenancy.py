"""Who may see which case: its owning partner, its reviewers, and operations.

Services learn a case's partner from the case workflow's commands (`records.collect`, `insurance.verify`,
`review.match`) and register it here, in the auth schema every service already reads; the checks of every
service's API read it back. A case's reviewers are the specialists it is offered or assigned to now, and the
author of its signed report: the review service settles each (case, specialist) pair against its reviews
whenever they change (`settle_reviewer`), granting or revoking, and the audit log records each change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from sqlalchemy import and_, literal_column
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session, col

from services.auth import audit
from services.auth.models import CaseOwner, CaseReviewer, Role
from services.common.db import transaction_lock

log = structlog.get_logger(__name__)


def register_owner(
    engine: Engine, case_id: str, partner_id: str | None, patient_id: str | None = None
) -> None:
    """Record the case's partner, and the referring facility's patient id (for the ATNA feed's messages); the
    first partner stands (idempotent), a patient id fills one not yet known."""
    if not partner_id:
        return
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(CaseOwner).on_conflict_do_update(
        index_elements=["case_id"],
        set_={"patient_id": literal_column("excluded.patient_id")},
        where=and_(col(CaseOwner.patient_id).is_(None), literal_column("excluded.patient_id").is_not(None)),
    )
    values = {
        "case_id": case_id,
        "partner_id": partner_id,
        "patient_id": patient_id[:64] if patient_id else None,
    }
    try:
        with engine.begin() as conn:
            conn.execute(statement, values)
    except (OperationalError, ProgrammingError) as exc:
        # Without the auth schema (a service tested alone) the case stays visible to operations only.
        log.warning("tenancy.not_registered", case_id=case_id, error=type(exc).__name__)


@dataclass(frozen=True)
class ReviewerStanding:
    """Whether a specialist may read a case now, and why (for the audit log: no PHI)."""

    may_read: bool
    why: str


# Settlements of one (case, specialist) pair take turns: a transaction-scoped PostgreSQL advisory lock in this
# key space (the two-key form, apart from the audit chain's one-key lock), or this process's lock on SQLite.
REVIEWER_LOCKS = 0x5EC0_A0D2
_local_lock = threading.Lock()
REVIEWER_ACCESS = "case.reviewer_access"  # the audit log's resource for a grant or revocation


def settle_reviewer(
    engine: Engine,
    case_id: str,
    specialist_id: str,
    standing: Callable[[], ReviewerStanding],
    *,
    service: str,
) -> bool | None:
    """Make the registry say what `standing` says now: grant the specialist read access to the case, or revoke
    it, with an audit entry in the same transaction. `standing` is read under a lock on the pair, so whichever
    settlement runs last applies the state as committed last, whatever order they started in (a grant that
    runs late reads the decline that followed the offer). Returns True for a grant, False for a revocation,
    None when the registry already said so (a settlement again, or a redelivered message: nothing written)."""
    with Session(engine) as session, _pair_locked(session, case_id, specialist_id):
        now = standing()
        row = session.get(CaseReviewer, (case_id, specialist_id))
        if now.may_read == (row is not None):
            return None
        if row is None:
            session.add(CaseReviewer(case_id=case_id, specialist_id=specialist_id))
            detail = f"{specialist_id} may read the case's records and report: {now.why}"
        else:
            session.delete(row)
            detail = f"{specialist_id} may no longer read the case's records and report: {now.why}"
        owner = session.get(CaseOwner, case_id)
        audit.record_in(
            session,
            actor=service,
            partner_id=owner.partner_id if owner else None,
            role=None,
            service=service,
            action="create" if now.may_read else "delete",
            resource=REVIEWER_ACCESS,
            case_id=case_id,
            outcome="success",
            detail=detail,
        )
        session.commit()
    log.info("tenancy.reviewer_settled", case_id=case_id, specialist_id=specialist_id, may_read=now.may_read)
    return now.may_read


@contextmanager
def _pair_locked(session: Session, case_id: str, specialist_id: str) -> Iterator[None]:
    if transaction_lock(session, REVIEWER_LOCKS, f"{case_id}\x1f{specialist_id}"):
        yield  # released when the session's transaction ends
        return
    with _local_lock:
        yield


def owner_of(engine: Engine, case_id: str) -> str | None:
    with Session(engine) as session:
        owner = session.get(CaseOwner, case_id)
    return owner.partner_id if owner else None


def is_reviewer(engine: Engine, case_id: str, specialist_id: str | None) -> bool:
    if specialist_id is None:
        return False
    with Session(engine) as session:
        return session.get(CaseReviewer, (case_id, specialist_id)) is not None


def may_see_case(
    engine: Engine, role: Role, partner_id: str | None, specialist_id: str | None, case_id: str
) -> bool:
    if role == Role.OPERATIONS:
        return True
    if role == Role.PARTNER:
        return partner_id is not None and owner_of(engine, case_id) == partner_id
    return is_reviewer(engine, case_id, specialist_id)
