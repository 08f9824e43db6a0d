"""Who may see which case: its owning partner, the specialists it was offered to, and operations.

Services learn a case's partner from the case workflow's commands (`records.collect`, `insurance.verify`,
`review.match`) and its reviewers from their offers, and register them here, in the auth schema every
service already reads; the checks of every service's API read them back.
"""

from __future__ import annotations

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session

from services.auth.models import CaseOwner, CaseReviewer, Role
from services.common.db import insert_skipping_taken

log = structlog.get_logger(__name__)


def _insert_once(engine: Engine, table: type[CaseOwner] | type[CaseReviewer], **values: str) -> None:
    statement = insert_skipping_taken(engine.dialect.name, table)
    try:
        with engine.begin() as conn:
            conn.execute(statement, values)
    except (OperationalError, ProgrammingError) as exc:
        # Without the auth schema (a service tested alone) the case stays visible to operations only.
        log.warning("tenancy.not_registered", case_id=values.get("case_id"), error=type(exc).__name__)


def register_owner(engine: Engine, case_id: str, partner_id: str | None) -> None:
    """Record the case's partner; the first registration stands (idempotent)."""
    if partner_id:
        _insert_once(engine, CaseOwner, case_id=case_id, partner_id=partner_id)


def register_reviewer(engine: Engine, case_id: str, specialist_id: str) -> None:
    _insert_once(engine, CaseReviewer, case_id=case_id, specialist_id=specialist_id)


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
