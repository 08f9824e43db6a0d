"""The audit log: who read or wrote which case's PHI, when, why, and whether it was allowed.

Entries are committed in the audit log's own transactions, never the request's, so a denied or failed
attempt is kept even when the request's own work is rolled back; `record` returns once its entry is
committed. A change of who may see a case (`tenancy.settle_reviewer`) is the exception: `record_in` writes
its entry in the change's own transaction, so neither is kept without the other. PostgreSQL refuses UPDATE, DELETE and TRUNCATE on the table (migrations 0001 and 0003), and
every entry carries the hash of the one before it (`audit_chain`), so a change made around the triggers
is still found by `secondopinion audit verify`.

Extending the chain takes a lock (one writer at a time across all services). Taking it once per entry
queued every concurrent request behind one commit after another: the intake profile showed request
threads waiting on the chain more than on their own work. So entries that arrive while a batch is being
written wait, and go into the next batch together: one lock, one read of the head, one commit for all
of them (a group commit).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NotRequired, TypedDict, Unpack

from sqlalchemy import literal_column, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from services.auth.audit_chain import GENESIS, entry_hash
from services.auth.models import AuditEvent, ReadWindow
from services.common.db import insert_skipping_taken

# One writer at a time extends the chain (a transaction-scoped PostgreSQL advisory lock).
CHAIN_LOCK = 0x5EC0_A0D1
CASE_ID_LENGTH = 36  # audit_events.case_id: a case id is a UUID


class EntryFields(TypedDict):
    """What an entry says: who (actor, partner, role) did what (action on resource, for a case), with what
    outcome, why (purpose of use) and any detail (cut at 500 characters)."""

    actor: str
    partner_id: str | None
    role: str | None
    service: str
    action: str
    resource: str
    outcome: str
    case_id: NotRequired[str | None]
    purpose: NotRequired[str]
    detail: NotRequired[str]
    network_address: NotRequired[str | None]


def _entry(fields: EntryFields) -> AuditEvent:
    """The entry, every value fitting its column. A case id longer than a case id is (any text a client put in
    a URL) names no case: kept out of the entry, which says so, rather than failing the INSERT, which lost the
    entry and answered the request it recorded with a 422 "cannot be stored"."""
    values: dict[str, Any] = {"case_id": None, "purpose": "TREAT", "detail": "", **fields}
    case_id = values["case_id"]
    if case_id is not None and len(case_id) > CASE_ID_LENGTH:
        sent = f"the case id sent is not one ({len(case_id)} characters)"
        values["detail"], values["case_id"] = "; ".join(filter(None, [values["detail"], sent])), None
    values["detail"] = values["detail"][:500]
    return AuditEvent(**values)


def record(engine: Engine, **fields: Unpack[EntryFields]) -> None:
    """Append one entry to the chain; returns once it is committed."""
    _chain_of(engine).append(engine, _entry(fields))


def record_once(engine: Engine, window: dict[str, Any], **fields: Unpack[EntryFields]) -> bool:
    """Append the entry unless `window` (a read window's row, services.auth.read_windows) is already taken:
    the row and the entry are committed together, in a batch as `record`'s. Whether the entry was written."""
    return _chain_of(engine).append(engine, _entry(fields), window)


# Entries written together at most (one INSERT each, one commit for all).
MAX_BATCH = 200


@dataclass(eq=False)
class _Waiting:
    event: AuditEvent
    window: dict[str, Any] | None = None  # written only if this read window's row is not taken
    written: bool = True
    woken: threading.Event = field(default_factory=threading.Event)
    leads: bool = False  # this caller writes the next batch (its own entry first)
    error: BaseException | None = None


class _Chain:
    """The entries of one process waiting to extend one database's chain.

    No thread of its own: the caller that finds no batch being written writes one (its own entry and
    everything queued behind it), then hands the writing to the first caller still waiting, and so on.
    Every caller returns once its own batch is committed, or raises what failed its entry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._writing = False

    def append(self, engine: Engine, event: AuditEvent, window: dict[str, Any] | None = None) -> bool:
        me = _Waiting(event, window)
        with self._lock:
            self._queue.append(me)
            if not self._writing:
                self._writing = me.leads = True
        if not me.leads:
            me.woken.wait()
        if me.leads:
            self._write_batch(engine)
        if me.error is not None:
            raise me.error
        return me.written

    def _write_batch(self, engine: Engine) -> None:
        with self._lock:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        try:
            _extend(engine, batch)
        except Exception:
            # One bad entry must not cost the others theirs: each is written on its own instead.
            for waiting in batch:
                try:
                    waiting.event = _unwritten(waiting.event)
                    _extend(engine, [waiting])
                except BaseException as exc:
                    waiting.error = exc
        except BaseException as exc:
            for waiting in batch:
                waiting.error = exc
        finally:
            with self._lock:
                if self._queue:
                    following = self._queue[0]
                    following.leads = True
                    following.woken.set()
                else:
                    self._writing = False
            for waiting in batch:
                waiting.woken.set()


def record_in(session: Session, **fields: Unpack[EntryFields]) -> None:
    """Append one entry in the caller's transaction, for a change (of who may see a case) that must not happen
    without its entry, nor its entry without it: they commit, or roll back, together. The chain's lock is held
    until the caller commits: keep that transaction short."""
    _append(session, [_entry(fields)])


def _extend(engine: Engine, batch: list[_Waiting]) -> None:
    """Append the entries of `batch` to the chain, in order, in one transaction; one with a read window whose
    row is taken is not written (`written` False)."""
    with Session(engine) as session:
        # Windows are taken under the chain's lock: no two batches insert window rows at once (no waits, no
        # deadlock between two replicas' batches taking the same two windows in opposite orders).
        _lock_chain(session)
        for waiting in batch:
            if waiting.window is not None:
                waiting.written = _take_window(session, waiting.window)
        _append(session, [waiting.event for waiting in batch if waiting.written], locked=True)
        session.commit()


def _take_window(session: Session, window: dict[str, Any]) -> bool:
    insert = insert_skipping_taken(session.get_bind().dialect.name, ReadWindow)
    return session.connection().execute(insert.returning(literal_column("1")), window).first() is not None


def _lock_chain(session: Session) -> None:
    """Take the chain's lock until the session's transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})


def _append(session: Session, events: list[AuditEvent], *, locked: bool = False) -> None:
    if not events:
        return
    if not locked:
        _lock_chain(session)
    head = session.exec(select(AuditEvent.row_hash).order_by(col(AuditEvent.id).desc()).limit(1)).first()
    for event in events:
        event.prev_hash = head or GENESIS
        event.row_hash = head = entry_hash(event)
        session.add(event)
        session.flush()  # one INSERT at a time: ids follow the chain's order


def _unwritten(event: AuditEvent) -> AuditEvent:
    """The entry as `record` made it, before a failed batch gave it an id and a place in the chain."""
    return AuditEvent(**event.model_dump(exclude={"id", "prev_hash", "row_hash"}))


_chains: dict[str, _Chain] = {}
_chains_lock = threading.Lock()


def _chain_of(engine: Engine) -> _Chain:
    key = engine.url.render_as_string(hide_password=True)
    with _chains_lock:
        return _chains.setdefault(key, _Chain())


def entries(
    engine: Engine,
    *,
    case_id: str | None = None,
    partner_id: str | None = None,
    since: datetime | None = None,
    limit: int = 500,
    after: int | None = None,
) -> list[AuditEvent]:
    """The entries matching, oldest first, `limit` of them from the one after entry `after` (a page)."""
    query = (
        _matching(select(AuditEvent), case_id, partner_id, since).order_by(col(AuditEvent.id)).limit(limit)
    )
    if after is not None:
        query = query.where(col(AuditEvent.id) > after)
    with Session(engine) as session:
        return list(session.exec(query).all())


def count(
    engine: Engine,
    *,
    case_id: str | None = None,
    partner_id: str | None = None,
    since: datetime | None = None,
) -> int:
    """How many entries match, on every page."""
    query = _matching(select(func.count()).select_from(AuditEvent), case_id, partner_id, since)
    with Session(engine) as session:
        return int(session.exec(query).one())


def _matching(query: Any, case_id: str | None, partner_id: str | None, since: datetime | None) -> Any:
    if case_id is not None:
        query = query.where(AuditEvent.case_id == case_id)
    if partner_id is not None:
        query = query.where(AuditEvent.partner_id == partner_id)
    if since is not None:
        query = query.where(col(AuditEvent.at) >= since)
    return query
