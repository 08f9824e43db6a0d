"""Real API keys for tests that call a service's API (every route but health and docs needs one)."""

from __future__ import annotations

from functools import cache

from sqlmodel import Session

from services.auth.models import Role
from services.auth.partners import issue_key
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine


@cache
def _operations_key(database_url: str, settings_json: str) -> str:
    settings = Settings.model_validate_json(settings_json)
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    with Session(engine) as session:
        issued = issue_key(session, Role.OPERATIONS, None, label="tests")
        session.commit()
    return issued.api_key


def operations_headers(settings: Settings) -> dict[str, str]:
    """`Authorization` for an operations key in this test session's auth schema (sees every case)."""
    key = _operations_key(settings.database_url or "", settings.model_dump_json())
    return {"Authorization": f"Bearer {key}"}


@cache
def _specialist_key(database_url: str, settings_json: str, specialist_id: str) -> str:
    settings = Settings.model_validate_json(settings_json)
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    with Session(engine) as session:
        issued = issue_key(session, Role.SPECIALIST, None, label="tests", specialist_id=specialist_id)
        session.commit()
    return issued.api_key


def specialist_headers(settings: Settings, specialist_id: str = "spec-gyn-1") -> dict[str, str]:
    """`Authorization` for the key a specialist signs with (findings and answers take no other)."""
    key = _specialist_key(settings.database_url or "", settings.model_dump_json(), specialist_id)
    return {"Authorization": f"Bearer {key}"}
