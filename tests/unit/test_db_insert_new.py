"""Inserts that skip taken keys, on SQLite (the demo's database; PostgreSQL's path runs in the outbox,
webhook and AMQP tests): `insert_new`, one row per key however often it is inserted, in the caller's
transaction, noted as added; and the consumer's inbox claim built on it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlmodel import Session, SQLModel, create_engine, func, select

from services.common.db import ADDED, Outbox, insert_new


def outbox_row(message_id: str) -> Outbox:
    return Outbox(message_id=message_id, exchange="case.events", routing_key="t", body=b"{}")


def test_a_taken_key_is_skipped_and_the_rest_inserted_in_order(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    SQLModel.metadata.create_all(engine, tables=[Outbox.__table__])  # type: ignore[list-item]
    with Session(engine) as session:
        insert_new(session, [outbox_row("a")])
        insert_new(session, [outbox_row("a"), outbox_row("b")])
        assert session.info[ADDED] == {Outbox}
        session.rollback()  # written in the session's transaction: a rollback takes it back
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Outbox)).one() == 0
        insert_new(session, [outbox_row("a")])
        insert_new(session, [outbox_row("a"), outbox_row("b")])
        session.commit()
        rows = session.exec(select(Outbox).order_by(Outbox.id)).all()  # type: ignore[arg-type]
    assert [r.message_id for r in rows] == ["a", "b"]
    assert all(r.created_at is not None and r.published_at is None for r in rows)


def test_nothing_to_insert_is_no_statement(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with Session(engine) as session:
        insert_new(session, [])  # no table exists: any statement would fail
        assert ADDED not in session.info


def test_the_consumer_claims_each_message_once_on_sqlite(tmp_path: Path) -> None:
    """The inbox claim (`INSERT ... ON CONFLICT DO NOTHING RETURNING`) on SQLite: a message is applied
    once, alone or in a batch, a repeat within the batch included."""
    from contracts.envelope import CloudEvent
    from services.common.amqp import Consumer
    from services.common.config import Settings
    from services.common.db import Inbox

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    SQLModel.metadata.create_all(engine, tables=[Inbox.__table__])  # type: ignore[list-item]
    applied: list[str] = []
    consumer = Consumer(
        settings=Settings(), queue="q", engine=engine, handle=lambda _, event: applied.append(event.id)
    )

    def message(message_id: str) -> CloudEvent:
        return CloudEvent(
            id=message_id,
            source="/test",
            type="test.happened",
            subject="case-1",
            time=datetime.now(UTC),
            data={},
        )

    assert consumer.apply(message("a")) is True
    assert consumer.apply(message("a")) is False
    assert consumer.apply_batch([message("b"), message("a"), message("c"), message("b")]) == [
        True,
        False,
        True,
        False,
    ]
    assert applied == ["a", "b", "c"]
    with Session(engine) as session:
        assert sorted(session.exec(select(Inbox.message_id)).all()) == ["a", "b", "c"]
