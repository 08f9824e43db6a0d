"""The audit log on the real PostgreSQL: the application's role cannot change or remove an entry, and an
entry changed or removed around that (as a superuser) is found by the hash-chain verifier and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from services.auth import audit
from services.auth.audit_chain import verify
from services.auth.models import AuditEvent
from services.common import migrate
from services.common.config import PROJECT_ROOT, Settings
from services.common.db import make_engine


@pytest.fixture(scope="module")
def auth(settings: Settings) -> Engine:
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    return engine


def write(auth: Engine, n: int) -> list[int]:
    for i in range(n):
        audit.record(
            auth,
            actor="key:0123456789ab",
            partner_id="clinic-a",
            role="partner",
            service="records",
            action="read",
            resource="records",
            case_id=f"case-{i}",
            outcome="success",
        )
    with Session(auth) as session:
        newest = session.exec(select(AuditEvent.id).order_by(col(AuditEvent.id).desc()).limit(n)).all()
    return [entry_id for entry_id in reversed(newest) if entry_id is not None]


def verify_cli() -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "audit", "verify"],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def as_superuser(settings: Settings, statement: str, entry_id: int) -> None:
    """Tamper the way only a database superuser can: with the append-only triggers switched off."""
    assert settings.database_url
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(statement.replace("{id}", str(int(entry_id))))


def test_each_entry_carries_the_hash_of_the_one_before(auth: Engine) -> None:
    ids = write(auth, 3)
    with Session(auth) as session:
        rows = session.exec(
            select(AuditEvent).where(col(AuditEvent.id).in_(ids)).order_by(col(AuditEvent.id))
        ).all()
    assert rows[1].prev_hash == rows[0].row_hash and rows[2].prev_hash == rows[1].row_hash
    report = verify(auth)
    assert report.intact and report.head == rows[-1].row_hash
    code, shown = verify_cli()
    assert code == 0 and shown["intact"] is True


def entry(case_id: str, action: str = "read") -> dict[str, Any]:
    return {
        "actor": "key:0123456789ab",
        "partner_id": "clinic-a",
        "role": "partner",
        "service": "intake",
        "action": action,
        "resource": "case",
        "case_id": case_id,
        "outcome": "success",
    }


def test_concurrent_entries_are_committed_together_and_chained_in_order(
    auth: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries arriving while a batch is written go into the next batch together (one lock, one commit):
    here the first caller's commit is held until 29 more are waiting, so 30 entries take 2 commits."""
    extend, batches, waiting = audit._extend, [], threading.Event()

    def held_first(engine: Engine, events: list[AuditEvent]) -> None:
        if not batches:
            assert waiting.wait(30), "the other callers never queued"
        batches.append(len(events))
        extend(engine, events)

    monkeypatch.setattr(audit, "_extend", held_first)
    chain = audit._chain_of(auth)

    def watch() -> None:
        while len(chain._queue) < 29:  # the first is being written, the rest wait
            time.sleep(0.005)
        waiting.set()

    threading.Thread(target=watch, daemon=True).start()
    with ThreadPoolExecutor(30) as pool:
        list(pool.map(lambda i: audit.record(auth, **entry(f"group-{i}")), range(30)))
    assert batches == [1, 29]
    with Session(auth) as session:
        written = session.exec(select(AuditEvent).where(col(AuditEvent.case_id).like("group-%"))).all()
    assert sorted(e.case_id or "" for e in written) == sorted(f"group-{i}" for i in range(30))
    assert verify(auth).intact


def test_a_bad_entry_fails_only_its_own_caller(auth: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry the database refuses (an action longer than its column) fails its batch; the others are
    written one by one, and only its caller gets the error."""
    extend, held = audit._extend, threading.Event()

    def hold_until_queued(engine: Engine, events: list[AuditEvent]) -> None:
        held.wait(5)
        extend(engine, events)

    monkeypatch.setattr(audit, "_extend", hold_until_queued)
    chain = audit._chain_of(auth)
    calls = [entry("lone-0"), entry("lone-1"), entry("lone-bad", action="x" * 40), entry("lone-3")]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(audit.record, auth, **call) for call in calls[:1]]
        while not chain._writing:
            time.sleep(0.001)
        futures += [pool.submit(audit.record, auth, **call) for call in calls[1:]]
        while len(chain._queue) < 3:
            time.sleep(0.001)
        held.set()
        outcomes = [f.exception() for f in futures]
    assert [o is None for o in outcomes] == [True, True, False, True]
    assert isinstance(outcomes[2], DBAPIError)
    with Session(auth) as session:
        written = session.exec(select(AuditEvent.case_id).where(col(AuditEvent.case_id).like("lone-%"))).all()
    assert sorted(c or "" for c in written) == ["lone-0", "lone-1", "lone-3"]
    assert verify(auth).intact


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET outcome = 'success' WHERE id = {id}",
        "DELETE FROM audit_events WHERE id = {id}",
        "TRUNCATE audit_events",
    ],
)
def test_the_application_cannot_change_or_remove_an_entry(auth: Engine, statement: str) -> None:
    (entry_id,) = write(auth, 1)
    with pytest.raises(DBAPIError, match="append-only"), auth.begin() as conn:
        conn.execute(text(statement.replace("{id}", str(entry_id))))
    with Session(auth) as session:
        assert session.get(AuditEvent, entry_id) is not None


def test_a_changed_entry_is_found(auth: Engine, settings: Settings) -> None:
    first, changed, _ = write(auth, 3)
    as_superuser(settings, "UPDATE auth.audit_events SET case_id = 'case-other' WHERE id = {id}", changed)

    report = verify(auth)
    assert [(b.entry_id, "changed" in b.reason) for b in report.breaks] == [(changed, True)]
    code, shown = verify_cli()
    assert code == 1
    assert changed in [b["entry_id"] for b in shown["breaks"]]
    as_superuser(settings, "DELETE FROM auth.audit_events WHERE id >= {id}", first)  # back to a valid chain


def test_a_removed_entry_is_found(auth: Engine, settings: Settings) -> None:
    first, removed, after = write(auth, 3)
    assert verify(auth).intact
    as_superuser(settings, "DELETE FROM auth.audit_events WHERE id = {id}", removed)

    report = verify(auth)
    assert [(b.entry_id, "removed" in b.reason) for b in report.breaks] == [(after, True)]
    code, shown = verify_cli()
    assert code == 1 and [b["entry_id"] for b in shown["breaks"]] == [after]
    as_superuser(settings, "DELETE FROM auth.audit_events WHERE id >= {id}", first)
