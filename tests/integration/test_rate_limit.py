"""Per-key rate limits on a service API: a token bucket per key, 429 with Retry-After, other keys unaffected."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth.deps import auth_engine, rate_limiter
from services.auth.partners import create_partner
from services.auth.rate_limit import RateLimiter, RateLimitSettings
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.insurance import api as insurance_api


@pytest.fixture(scope="module")
def auth(settings: Settings) -> Engine:
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    return engine


@pytest.fixture
def client(auth: Engine, settings: Settings) -> Iterator[TestClient]:
    insurance = make_engine("insurance", settings)
    migrate.upgrade("insurance", insurance)
    app = create_app("insurance", routers=[insurance_api.router], engine=lambda: insurance)
    app.dependency_overrides[auth_engine] = lambda: auth
    # A token every 2 s: the burst's four requests stay well inside one refill even on a loaded machine.
    limiter = RateLimiter(per_second=0.5, burst=3)
    app.dependency_overrides[rate_limiter] = lambda: limiter
    with TestClient(app) as c:
        yield c


def partner_key(auth: Engine, name: str) -> dict[str, str]:
    with Session(auth) as session:
        key = create_partner(session, name).api_key
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def test_a_key_over_its_burst_gets_429_with_retry_after_and_others_do_not(
    auth: Engine, client: TestClient
) -> None:
    busy, quiet = partner_key(auth, "Busy clinic"), partner_key(auth, "Quiet clinic")
    answers = [client.get("/v1/coverage/plans", headers=busy).status_code for _ in range(3)]
    assert answers == [200, 200, 200]

    limited = client.get("/v1/coverage/plans", headers=busy)
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "retry after" in limited.json()["detail"]
    assert client.get("/v1/coverage/plans", headers=quiet).status_code == 200

    time.sleep(2.1)  # a token every 2 s: one is back
    assert client.get("/v1/coverage/plans", headers=busy).status_code == 200


def test_the_limits_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_RATE_PER_SECOND", "5")
    monkeypatch.setenv("AUTH_RATE_BURST", "10")
    assert (RateLimitSettings().per_second, RateLimitSettings().burst) == (5.0, 10)
    off = RateLimiter(per_second=0, burst=0)
    assert all(off.acquire("k") == 0 for _ in range(1000))
