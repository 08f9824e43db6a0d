"""`after_commit`: an action for another database runs once its transaction has committed, never for one that
rolled back, and after the session has given its connection back (the action may use the same pool)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlmodel import Session, create_engine

from services.common.db import after_commit


def test_the_action_runs_after_the_commit_with_the_connection_back_in_the_pool(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    checked_out: list[int] = []
    with Session(engine) as session:
        after_commit(session, lambda: checked_out.append(engine.pool.checkedout()))  # type: ignore[attr-defined]
        session.execute(text("SELECT 1"))
        with session.begin_nested():  # a savepoint released is not the commit
            session.execute(text("SELECT 2"))
        assert checked_out == []
        session.commit()
        session.execute(text("SELECT 3"))
        session.commit()  # once only
    assert checked_out == [0]


def test_a_transaction_rolled_back_drops_the_action_even_when_the_session_commits_later(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ran: list[str] = []
    with Session(engine) as session:
        after_commit(session, lambda: ran.append("rolled back"))
        session.execute(text("SELECT 1"))
        session.rollback()
        after_commit(session, lambda: ran.append("committed"))
        session.execute(text("SELECT 1"))
        session.commit()
    assert ran == ["committed"]
