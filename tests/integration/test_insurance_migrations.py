"""Insurance's migration 0004 on PostgreSQL and SQLite: every payer keeps the MIME envelope it was asked in,
an operator can set `soap`, nothing else, and a downgrade takes the column away again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from tests.infra import postgres_database

ENVELOPES = text("SELECT payer_id, core_envelope FROM insurance_payers ORDER BY payer_id")


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine("insurance", Settings(data_dir=tmp_path, database_url=None))
        yield engine
        engine.dispose()
        return
    with postgres_database() as url:
        engine = make_engine("insurance", Settings(data_dir=tmp_path, database_url=url))
        yield engine
        engine.dispose()


def test_payers_keep_the_mime_envelope_and_may_be_set_to_soap(engine: Engine) -> None:
    config = migrate.alembic_config("insurance", engine)
    command.upgrade(config, "0003")
    command.upgrade(config, "head")
    with engine.begin() as db:
        envelopes = {payer: envelope for payer, envelope in db.execute(ENVELOPES)}
        assert set(envelopes.values()) == {"mime"} and "SBX01" in envelopes
        db.execute(text("UPDATE insurance_payers SET core_envelope = 'soap' WHERE payer_id = 'SBX01'"))
    if engine.dialect.name != "sqlite":  # SQLite cannot add the check constraint to an existing table
        with pytest.raises(IntegrityError), engine.begin() as db:
            db.execute(text("UPDATE insurance_payers SET core_envelope = 'xml' WHERE payer_id = 'ACME'"))

    command.downgrade(config, "0003")
    with engine.begin() as db:
        columns = db.execute(text("SELECT * FROM insurance_payers")).keys()
        assert "core_envelope" not in columns
    command.upgrade(config, "head")
    with engine.begin() as db:
        assert set({payer: envelope for payer, envelope in db.execute(ENVELOPES)}.values()) == {"mime"}


def test_answers_kept_before_0006_keep_no_request_and_new_ones_can(engine: Engine) -> None:
    """0006 adds the request kept beside each eligibility answer; the answers kept before have none (a read of
    their request is a 404 saying so), and a downgrade takes the column away again."""
    config = migrate.alembic_config("insurance", engine)
    command.upgrade(config, "0005")
    with engine.begin() as db:
        db.execute(
            text(
                "INSERT INTO eligibility_responses (id, partner_id, resource, created_at) "
                "VALUES ('before', 'p', '{}', CURRENT_TIMESTAMP)"
            )
        )
    command.upgrade(config, "head")
    with engine.begin() as db:
        assert (
            db.execute(text("SELECT request FROM eligibility_responses WHERE id = 'before'")).scalar() is None
        )
        db.execute(
            text(
                "INSERT INTO eligibility_responses (id, partner_id, resource, request, created_at) "
                "VALUES ('after', 'p', '{}', '{\"resourceType\": \"CoverageEligibilityRequest\"}', CURRENT_TIMESTAMP)"
            )
        )
    command.downgrade(config, "0005")
    with engine.begin() as db:
        columns = list(db.execute(text("SELECT * FROM eligibility_responses")).keys())
        assert "request" not in columns
        assert db.execute(text("SELECT count(*) FROM eligibility_responses")).scalar() == 2
