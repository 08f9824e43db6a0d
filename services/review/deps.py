"""What every review route depends on: the session, the settings, and who the caller is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Query
from sqlalchemy.engine import Engine
from sqlmodel import Session

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
    reviewer: Annotated[
        str | None,
        Query(min_length=1, max_length=50, description="the specialist's id, e.g. spec-ob-1"),
    ] = None,
) -> str | None:
    """Who is acting. A query parameter until specialists authenticate (the intake issue): then this one
    dependency returns the authenticated specialist's id instead."""
    return reviewer


CurrentReviewer = Annotated[str | None, Depends(current_reviewer)]


class _Relay:
    """After a commit that wrote to the outbox: main.py points `wake` at the runtime's relay so the event goes
    out at once; without it (tests, scripts) the relay's 0.5 s poll still publishes it."""

    wake: Callable[[], None] = staticmethod(lambda: None)


relay = _Relay()
