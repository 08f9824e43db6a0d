"""Property-based tests of intake from its own OpenAPI document (schemathesis): no input gives a 5xx.

Runs against the real PostgreSQL with a partner's key, so requests get past authentication and reach the
handlers; Temporal is down, which must also never turn into a 500.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy.engine import Engine

from services.auth import api as partners_api
from services.auth import auth_engine
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.intake import api, fhir_api, webhooks_in, webhooks_out_api
from tests.integration.test_intake_api import new_partner

# The schema is read at import (to parametrize the test); the database only exists once `settings` does.
ENGINES: dict[str, Engine] = {}
KEY: dict[str, str] = {}

app = create_app(
    "intake",
    routers=[api.router, fhir_api.router, webhooks_in.router, partners_api.router, webhooks_out_api.router],
    engine=lambda: ENGINES["intake"],
)
app.dependency_overrides[api.intake_engine] = lambda: ENGINES["intake"]
app.dependency_overrides[auth_engine] = lambda: ENGINES["auth"]
app.dependency_overrides[api.temporal_client] = lambda: None
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def databases(settings: Settings) -> None:
    ENGINES["intake"], ENGINES["auth"] = make_engine("intake", settings), make_engine("auth", settings)
    migrate.upgrade("intake", ENGINES["intake"])
    migrate.upgrade("auth", ENGINES["auth"])
    KEY["Authorization"] = new_partner(ENGINES["auth"], "Fuzzer")["Authorization"]


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case: Any) -> None:
    case.call_and_validate(headers=dict(KEY), checks=[not_a_server_error])
