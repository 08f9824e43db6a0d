"""SQLModel engines and sessions, one schema (PostgreSQL) or one file (SQLite) per service."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Field, Session, SQLModel, create_engine

from services.common.config import Settings, get_settings


def utcnow() -> datetime:
    return datetime.now(UTC)


def database_url(service: str, settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return f"sqlite:///{settings.service_dir(service).parent / (service + '.db')}"


_engines: dict[tuple[str, str, int, int], Engine] = {}
_engines_lock = threading.Lock()


def make_engine(service: str, settings: Settings | None = None) -> Engine:
    """The engine for `service`'s schema; one per (service, database) in a process, so pools are shared."""
    settings = settings or get_settings()
    key = (
        service,
        database_url(service, settings),
        settings.database_pool_size,
        settings.database_max_overflow,
    )
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _new_engine(service, settings)
        return engine


def _new_engine(service: str, settings: Settings) -> Engine:
    url = database_url(service, settings)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        connect_args={"options": f"-csearch_path={service}"},
        # A statement's error would quote its parameters (a patient's name, the report text) in every log
        # line and span that carries the exception.
        hide_parameters=True,
    )
    ping_when_idle(engine, settings.database_ping_idle_seconds)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{service}"'))
    return engine


def ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection with a round trip before handing it out, if it sat idle longer than
    `idle_seconds`. `pool_pre_ping` does it at every checkout: one round trip more per transaction, a
    sixth of the intake service's database time under load, for connections used milliseconds before.
    A connection found dead is replaced (the pool retries the checkout). One that dies while in steady use
    fails its statement; SQLAlchemy then invalidates the whole pool, so only that statement is lost, and
    the HTTP layer answers it with a 503 to retry (see services.common.http)."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy):  # type: ignore[no-untyped-def]
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return  # new, or in steady use
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError("the pooled connection is closed") from error


@lru_cache
def get_engine(service: str) -> Engine:
    return make_engine(service)


ADDED = "added_models"  # session.info key: the models of the rows added in the session


@event.listens_for(OrmSession, "transient_to_pending")
def _note_added(session: OrmSession, row: object) -> None:
    # session.new would miss rows an autoflush already wrote; this sees every add.
    session.info.setdefault(ADDED, set()).add(type(row))


def engine_of(session: Session) -> Engine:
    """The engine behind `session`, also when it is bound to one of its connections: what an action run after
    the commit (after_commit) opens its own session on, the connection being back in the pool by then."""
    bind = session.get_bind()
    return bind.engine if isinstance(bind, Connection) else bind


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action` once the session's transaction has committed (never if it rolls back): for a write to
    another database that must not outlive a transaction that did not happen.

    It runs when the transaction has ended and the session has given its connection back to the pool, so the
    action may use the same engine without holding two connections at once (under load, every thread holding
    one and waiting for a second would empty the pool). A savepoint released is not the commit; a transaction
    rolled back drops the action, also when the session is committed later."""
    committed = done = False

    def on_commit(committing: OrmSession) -> None:
        nonlocal committed
        committed = committed or not committing.in_nested_transaction()

    def on_end(_: OrmSession, transaction: SessionTransaction) -> None:
        nonlocal done
        if done or transaction.parent is not None:
            return
        done = True
        if committed:
            action()

    event.listen(session, "after_commit", on_commit)
    event.listen(session, "after_transaction_end", on_end)


def transaction_lock(session: Session, space: int, key: int | str, *, shared: bool = False) -> bool:
    """Take a PostgreSQL advisory lock for the rest of the session's transaction: the two-key form, `space` a
    service's key space and `key` a number, or a name hashed to one. Concurrent transactions that take the same
    lock take turns (shared ones together). Returns False, having locked nothing, on another database
    (SQLite: one process on a laptop), where the caller guards itself if it must."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    if isinstance(key, str):
        key = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big", signed=True)
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    session.execute(
        text(f"SELECT {function}(CAST(:space AS integer), CAST(:key AS integer))"),
        {"space": space, "key": key},
    )
    return True


def insert_skipping_taken(dialect: str, table: Any) -> Any:
    """`INSERT ... ON CONFLICT DO NOTHING` into `table`, for PostgreSQL or SQLite; execute it with the rows as
    parameters (a dict, or a list of them in one statement). The statement is the same whatever the
    values, so it is compiled once: with the values inlined it cost twice the CPU per insert."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing()


def insert_new(session: Session, rows: list[SQLModel]) -> None:
    """Insert `rows` (all of one model) in one statement, skipping any whose primary or unique key is
    already taken (ON CONFLICT DO NOTHING): a look-up per row is not needed first. Written at once, in the
    session's transaction, and noted as added as `session.add` would be."""
    if not rows:
        return
    model = type(rows[0])
    table = model.__table__  # type: ignore[attr-defined]
    values = [
        {
            c.name: getattr(row, c.name)
            for c in table.columns
            if not (c.primary_key and getattr(row, c.name) is None)
        }
        for row in rows
    ]
    session.execute(insert_skipping_taken(session.get_bind().dialect.name, table), values)
    session.info.setdefault(ADDED, set()).add(model)


class Inbox(SQLModel, table=True):
    """Message ids a consumer has applied, written in the same transaction as the effect."""

    message_id: str = Field(primary_key=True, max_length=300)
    queue: str = Field(max_length=100)
    message_type: str = Field(max_length=100)
    processed_at: datetime = Field(default_factory=utcnow)


class Outbox(SQLModel, table=True):
    """Messages to publish, written in the same transaction as the change that caused them."""

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(unique=True, max_length=300)
    exchange: str = Field(max_length=100)
    routing_key: str = Field(max_length=100)
    body: bytes
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = Field(default=None, index=True)
