"""Intake's migrations on SQLite (the default database): 0006, references keep their identifier system; 0010,
FHIR Subscriptions created before it are version 1 with their first handshake."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.intake import fhir_subscriptions
from services.intake.models import FhirSubscription, WebhookEndpoint

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


def test_subscriptions_created_before_versions_are_version_1_with_their_first_handshake(
    tmp_path: Path,
) -> None:
    engine = make_engine("intake", Settings(data_dir=tmp_path, database_url=None))
    config = migrate.alembic_config("intake", engine)
    command.upgrade(config, "0009")
    with engine.begin() as db:
        db.execute(
            text(
                "INSERT INTO webhook_endpoints (id, partner_id, url, description, disabled_reason, created_at, kind, "
                "channel_headers) VALUES ('s-1', 'p', 'https://ehr.example.org/n', '', '', '2026-12-01', "
                "'fhir-subscription', '[]')"
            )
        )
        db.execute(
            text(
                "INSERT INTO fhir_subscriptions (id, partner_id, topic, task_statuses, payload_content, "
                "events_since_start, status, resource_json, last_queued_at, created_at) VALUES ('s-1', 'p', "
                "'case-status', '', 'id-only', 4, 'requested', '{}', '2026-12-01', '2026-12-01')"
            )
        )
    command.upgrade(config, "head")
    with Session(engine) as session:
        subscription = session.get(FhirSubscription, "s-1")
        endpoint = session.get(WebhookEndpoint, "s-1")
        assert subscription is not None and endpoint is not None
        assert (subscription.version_id, subscription.updated_at) == (1, None)
        assert subscription.handshake_event == fhir_subscriptions.HANDSHAKE
        resource = fhir_subscriptions.as_resource("https://x/fhir", subscription, "requested", "")
        assert resource["meta"]["versionId"] == "1" and resource["meta"]["lastUpdated"].startswith(
            "2026-12-01"
        )
    command.downgrade(config, "0009")
    with engine.begin() as db:
        assert db.execute(text("SELECT events_since_start FROM fhir_subscriptions")).scalar_one() == 4
    command.upgrade(config, "head")
    engine.dispose()
