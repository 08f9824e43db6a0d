"""One rate limit per key across replicas: the buckets live in the auth database, and each limiter here is a
process of its own (a replica, or the same one after a restart)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from structlog.testing import capture_logs

from services.auth import rate_limit
from services.auth.deps import auth_engine, rate_limiter
from services.auth.partners import create_partner
from services.auth.rate_limit import SharedRateLimiter, get_rate_limiter
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.insurance import api as insurance_api
from tests.infra import free_port


@pytest.fixture(scope="module")
def auth(settings: Settings) -> Engine:
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    return engine


def new_key() -> str:
    return f"k{uuid.uuid4().hex[:12]}"


def replica(auth: Engine, per_second: float, burst: int, kind: str = "api") -> SharedRateLimiter:
    return SharedRateLimiter(kind, per_second, burst, lambda: auth)


def bucket_row(auth: Engine, key: str) -> list[tuple[int]]:
    """The last grant of `key`'s API bucket, as the database holds it."""
    with Session(auth) as session:
        rows = session.execute(
            text("SELECT granted FROM rate_buckets WHERE kind = 'api' AND key = :key"), {"key": key}
        )
        return [tuple(row) for row in rows]


def take(limiter: SharedRateLimiter, key: str, n: int) -> list[bool]:
    return [limiter.acquire(key) == 0 for _ in range(n)]


def test_two_replicas_together_stay_within_burst_plus_refill(auth: Engine) -> None:
    burst, rate = 40, 20.0
    replicas, key = [replica(auth, rate, burst), replica(auth, rate, burst)], new_key()
    allowed = [0, 0, 0, 0]
    stop = threading.Event()

    def hammer(i: int) -> None:
        while not stop.is_set():
            if replicas[i % 2].acquire(key) == 0:
                allowed[i] += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]  # two threads per replica
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    assert burst <= sum(allowed) <= burst + rate * elapsed, (allowed, elapsed)
    assert allowed[0] + allowed[2] > 0 and allowed[1] + allowed[3] > 0  # both replicas served the key


def test_a_restarted_process_does_not_get_a_full_bucket_again(auth: Engine) -> None:
    key = new_key()
    before = replica(auth, 0.2, 5)
    assert take(before, key, 5) == [True] * 5
    assert before.acquire(key) > 0

    after = replica(auth, 0.2, 5)  # the process restarted: nothing of the bucket is in it
    wait = after.acquire(key)
    assert 0 < wait <= 5  # a token every 5 s; what the 429's Retry-After says


def test_a_keys_bucket_is_its_own_and_each_kind_is_separate(auth: Engine) -> None:
    busy, quiet = new_key(), new_key()
    api = replica(auth, 0.1, 3)
    assert take(api, busy, 4) == [True, True, True, False]
    assert take(replica(auth, 0.1, 3), quiet, 3) == [True] * 3  # another key, on another replica too
    for kind in ("images", "token"):
        assert take(replica(auth, 0.1, 3, kind), busy, 4) == [True, True, True, False], kind


def test_a_busy_key_takes_several_tokens_per_round_trip_and_idle_rows_are_swept(
    auth: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, idle = new_key(), new_key()
    limiter = replica(auth, 1000.0, 200)
    assert take(limiter, idle, 1) == [True]
    assert take(limiter, key, 100) == [True] * 100
    # Grants of 1, 2, 4, 8, then a twentieth of the burst: 13 round trips for 100 requests.
    assert bucket_row(auth, key) == [(10,)]

    monkeypatch.setattr(rate_limit, "IDLE_ROW_SECONDS", 0.0)
    monkeypatch.setattr(rate_limit, "SWEEP_EVERY", 1)
    time.sleep(0.3)  # the idle key's bucket is full again (200 at 1000 a second): its row says nothing
    take(replica(auth, 1000.0, 200), new_key(), 1)
    assert bucket_row(auth, idle) == []


def test_an_unreachable_database_leaves_each_process_its_own_bucket_and_no_error() -> None:
    dead = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    limiter = SharedRateLimiter("api", 0.1, 3, lambda: dead)
    key = new_key()
    with capture_logs() as logs:
        answers = take(limiter, key, 4)
    assert answers == [True, True, True, False]  # still limited, in this process
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["rate_limit.shared_buckets_unavailable"]
    assert key not in str(logs)


def test_a_bucket_set_to_zero_is_off_and_asks_nothing() -> None:
    dead = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    off = SharedRateLimiter("api", 0, 0, lambda: dead)
    with capture_logs() as logs:
        assert all(off.acquire("k") == 0 for _ in range(1000))
    assert logs == []


@pytest.fixture
def two_replicas(
    auth: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[TestClient]]:
    """Two insurance replicas, each with the API's limiter built from the settings as a process builds it."""
    monkeypatch.setenv("AUTH_RATE_PER_SECOND", "0.2")
    monkeypatch.setenv("AUTH_RATE_BURST", "3")
    insurance = make_engine("insurance", settings)
    migrate.upgrade("insurance", insurance)

    def serving() -> FastAPI:
        get_rate_limiter.cache_clear()  # a process of its own builds its own
        limiter = get_rate_limiter()
        app = create_app("insurance", routers=[insurance_api.router], engine=lambda: insurance)
        app.dependency_overrides[auth_engine] = lambda: auth
        app.dependency_overrides[rate_limiter] = lambda: limiter
        return app

    apps = [serving(), serving()]
    get_rate_limiter.cache_clear()
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        yield [first, second]


def test_a_key_over_its_burst_on_two_replicas_gets_429_from_either(
    auth: Engine, two_replicas: list[TestClient]
) -> None:
    with Session(auth) as session:
        key = create_partner(session, "Hospital integration").api_key
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    answers = [two_replicas[i % 2].get("/v1/coverage/plans", headers=headers) for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert int(answers[3].headers["Retry-After"]) >= 1
    assert two_replicas[0].get("/v1/coverage/plans", headers=headers).status_code == 429
