"""Pooled connections that the database closed (a restart, a failover, an idle timeout): a connection that
sat idle is checked before use and replaced; one in steady use fails one statement, the pool is renewed,
and an HTTP caller gets a 503 to retry, never a 500."""

from __future__ import annotations

import time

import psycopg
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def terminate(settings: Settings, pid: int) -> None:
    """What a server restart does to one pooled connection, and wait until it is gone."""
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url, autocommit=True) as admin:
        assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.02)


def engine_pinging_after(settings: Settings, service: str, idle_seconds: float) -> Engine:
    engine = make_engine(service, settings.model_copy(update={"database_ping_idle_seconds": idle_seconds}))
    engine.dispose()  # a fresh pool: one connection, checked in just now
    return engine


def test_a_connection_closed_while_idle_is_replaced_before_it_is_used(settings: Settings) -> None:
    engine = engine_pinging_after(settings, "pool_idle", 0.2)
    first = backend_pid(engine)
    terminate(settings, first)
    time.sleep(0.3)  # idle longer than the threshold: the pool checks it and connects anew

    assert backend_pid(engine) != first  # no error reached the caller


def test_a_connection_in_steady_use_is_not_pinged_and_one_lost_statement_renews_the_pool(
    settings: Settings,
) -> None:
    engine = engine_pinging_after(settings, "pool_busy", 60)
    first = backend_pid(engine)
    terminate(settings, first)

    # Used a moment ago, so no round trip checks it: the statement meets the closed connection.
    try:
        backend_pid(engine)
        raise AssertionError("a connection closed under the pool was used without an error")
    except DBAPIError as error:
        assert error.connection_invalidated
    assert backend_pid(engine) != first  # the next one gets a new connection


def test_the_http_answer_to_a_lost_database_connection_is_a_503_to_retry(settings: Settings) -> None:
    engine = engine_pinging_after(settings, "pool_http", 60)
    router = APIRouter()

    @router.get("/v1/probe")
    def probe(engine: Engine = Depends(lambda: engine)) -> dict[str, int]:
        return {"pid": backend_pid(engine)}

    client = TestClient(create_app("pooltest", routers=[router], engine=lambda: engine))
    first = client.get("/v1/probe").json()["pid"]
    terminate(settings, first)

    lost = client.get("/v1/probe")
    assert lost.status_code == 503
    assert lost.headers["retry-after"] == "1"
    assert lost.json()["title"] == "Database unavailable"
    assert "Retry" in lost.json()["detail"]
    again = client.get("/v1/probe")
    assert again.status_code == 200 and again.json()["pid"] != first
