"""Review's migration 0011 on SQLite (the default database): reports composed before it keep their case's partner
and order, read from the match their review was made by, so the FHIR search finds them."""

from __future__ import annotations

import json
from pathlib import Path

from alembic import command
from sqlalchemy import text

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine

REVIEW = text(
    "INSERT INTO reviews (id, case_id, reviewer_id, subspecialty, status, match_event_id, match_explanation, "
    "request, exam_type, urgency, due_at, assigned_at, critical_result) VALUES (:id, :case, 'spec-gyn-1', "
    "'gynecologic_imaging', 'submitted', :id, 'x', :request, 'pelvic', 'standard', '2026-12-01', '2026-12-01', "
    "false)"
)
REPORT = text(
    "INSERT INTO reports (id, case_id, review_id, pdf_sha256, pdf_path, diagnostic_report, created_at, version, "
    "own_addenda_delivered) VALUES (:id, :case, :review, '', '', '{}', '2026-12-01', 1, false)"
)


def test_reports_composed_before_keep_their_partner_and_order(tmp_path: Path) -> None:
    engine = make_engine("review", Settings(data_dir=tmp_path, database_url=None))
    config = migrate.alembic_config("review", engine)
    command.upgrade(config, "0010")
    matches = {
        "with-system": {"partner_id": "bayview", "partner_case_ref": "ORD-1",
                        "partner_case_ref_system": "urn:hospital-a:order"},
        "no-system": {"partner_id": "bayview", "partner_case_ref": "ORD-2"},
        "no-order": {"partner_id": "bayview"},
    }  # fmt: skip
    with engine.begin() as db:
        for case, request in matches.items():
            db.execute(REVIEW, {"id": f"r-{case}", "case": case, "request": json.dumps(request)})
            db.execute(REPORT, {"id": f"rep-{case}", "case": case, "review": f"r-{case}"})
    command.upgrade(config, "head")
    with engine.begin() as db:
        rows = db.execute(text("SELECT case_id, partner_id, order_value, order_system FROM reports")).all()
    assert sorted(tuple(r) for r in rows) == [
        ("no-order", "bayview", None, None),
        ("no-system", "bayview", "ORD-2", ""),
        ("with-system", "bayview", "ORD-1", "urn:hospital-a:order"),
    ]
    command.downgrade(config, "0010")
    command.upgrade(config, "head")
    engine.dispose()
