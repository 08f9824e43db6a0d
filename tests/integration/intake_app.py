"""The intake API as the integration tests run it: its own and the auth schema migrated on this session's
database, served in-process with those engines (and a Temporal client or none)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy.engine import Engine

from services.auth import auth_engine
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.intake import api


def intake_engines(settings: Settings) -> tuple[Engine, Engine]:
    """(intake, auth) engines with their migrations applied."""
    intake, auth = make_engine("intake", settings), make_engine("auth", settings)
    migrate.upgrade("intake", intake)
    migrate.upgrade("auth", auth)
    return intake, auth


def intake_app(engines: tuple[Engine, Engine], *routers: APIRouter, temporal: Any = None) -> FastAPI:
    """The intake app with `routers`; `temporal` None means workflows are left to the reconciler."""
    intake, auth = engines
    app = create_app("intake", routers=list(routers), engine=lambda: intake)
    app.dependency_overrides[api.intake_engine] = lambda: intake
    app.dependency_overrides[auth_engine] = lambda: auth
    app.dependency_overrides[api.temporal_client] = lambda: temporal
    return app
