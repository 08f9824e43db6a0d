"""Intake's migration 0006 on SQLite (the default database): references keep their identifier system."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine

INSERT = text(
    "INSERT INTO cases (id, partner_id, partner_case_ref, status, urgency, subspecialty, due_at, request_json, "
    "workflow_started, consent_on_file, created_at, updated_at) VALUES (:id, 'p', 'ORD-1', 'intake', "
    "'standard', 'x', '2026-12-01', '{}', false, true, '2026-12-01', '2026-12-01')"
)


def test_references_keep_their_system_and_a_downgrade_never_merges_two_orders(tmp_path: Path) -> None:
    engine = make_engine("intake", Settings(data_dir=tmp_path, database_url=None))
    config = migrate.alembic_config("intake", engine)
    command.upgrade(config, "0005")
    with engine.begin() as db:
        db.execute(INSERT, {"id": "before"})
    command.upgrade(config, "head")
    with engine.begin() as db:
        # Stored before systems were kept: "*", whatever system the order came with (found under any).
        assert db.execute(text("SELECT partner_case_ref_system FROM cases")).scalar_one() == "*"
        db.execute(
            text("UPDATE cases SET partner_case_ref_system = 'urn:hospital-b:order' WHERE id = 'before'")
        )
        db.execute(INSERT, {"id": "no-system"})  # the same value without a system: another order
    with pytest.raises(IntegrityError), engine.begin() as db:
        db.execute(INSERT, {"id": "repeat"})  # ... but only one of them

    with pytest.raises(RuntimeError, match="cannot be unique again"):
        command.downgrade(config, "0005")
    with engine.begin() as db:
        assert db.execute(text("SELECT count(*) FROM cases")).scalar_one() == 2  # nothing was changed
        db.execute(text("DELETE FROM cases WHERE id = 'no-system'"))
    command.downgrade(config, "0005")
    with pytest.raises(IntegrityError), engine.begin() as db:
        db.execute(INSERT, {"id": "repeat"})  # the old constraint is back
    engine.dispose()
