"""What every review route depends on: the session, the settings, and who the caller is.

A specialist key acts as its one specialist (`reviewer` is then ignored); operations name the reviewer
with `?reviewer=`, or act on any review without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import AuthEngine, Caller, Principal, Role, tenancy
from services.auth.access import record
from services.common.config import Settings, get_settings
from services.common.db import get_engine


def review_engine() -> Engine:
    return get_engine("review")


def get_session(engine: Annotated[Engine, Depends(review_engine)]) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def current_reviewer(
    caller: Caller,
    reviewer: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=50,
            description="operations only: the specialist to act as, e.g. spec-ob-1 (a specialist key is one)",
        ),
    ] = None,
) -> str | None:
    """Who is acting: the specialist of a specialist key, else the `reviewer` operations name (or None)."""
    if caller.role == Role.SPECIALIST:
        return caller.specialist_id or ""
    return reviewer


CurrentReviewer = Annotated[str | None, Depends(current_reviewer)]


class _Relay:
    """After a commit that wrote to the outbox: main.py points `wake` at the runtime's relay so the event goes
    out at once; without it (tests, scripts) the relay's 0.5 s poll still publishes it."""

    wake: Callable[[], None] = staticmethod(lambda: None)


relay = _Relay()


class Access:
    """Audits each read or write of a case's review or report, and answers 404 for one the key may not see."""

    def __init__(self, request: Request, caller: Caller, engine: AuthEngine) -> None:
        self.request, self.caller, self.engine = request, caller, engine

    def allow(self, resource: str, case_id: str) -> None:
        record(self.request, self.engine, self.caller, resource, case_id, "success")

    def deny(self, resource: str, case_id: str | None, detail: str) -> HTTPException:
        record(self.request, self.engine, self.caller, resource, case_id, "denied", "not visible to this key")
        return HTTPException(404, detail)

    def sees_report(self, case_id: str, reviewer_id: str | None) -> bool:
        """Operations, the case's partner, and the specialist who wrote the review."""
        caller: Principal = self.caller
        if caller.role == Role.OPERATIONS:
            return True
        if caller.role == Role.SPECIALIST:
            return reviewer_id is not None and caller.specialist_id == reviewer_id
        return caller.partner_id is not None and tenancy.owner_of(self.engine, case_id) == caller.partner_id


AccessDep = Annotated[Access, Depends(Access)]
