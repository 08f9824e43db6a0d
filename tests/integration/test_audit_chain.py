"""The audit log on the real PostgreSQL: the application's role cannot change or remove an entry, and an
entry changed or removed around that (as a superuser) is found by the hash-chain verifier and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
