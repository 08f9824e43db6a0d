"""Poison messages on the real broker: a malformed message and a handler that always fails reach the
dead-letter queue with their reasons, never loop, and `secondopinion dlq replay` after a fix applies them
exactly once. Operators' views never show the message's data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CloudEvent
from services.common.amqp import COMMANDS, Consumer, Publisher, ensure_topology
from services.common.config import Settings
from services.common.db import Inbox, make_engine
from tests.infra import purge_queues

QUEUE = "insurance"
CANARY = "Zyxwvutsky-DLQ-CANARY"


class Flaky:
    """A handler that fails until it is fixed, and counts what it applied."""

    def __init__(self) -> None:
        self.fixed = False
        self.calls = 0

    def __call__(self, session: Session, event: CloudEvent) -> None:
        self.calls += 1
        if not self.fixed:
            raise RuntimeError("the payer connector is misconfigured")
        session.execute(text("insert into dlq_applied (message_id) values (:m)"), {"m": event.id})


@pytest.fixture
def engine(settings: Settings) -> Engine:
    engine = make_engine("dlqtest", settings)
    Inbox.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(text("create table if not exists dlq_applied (message_id text not null)"))
        conn.execute(text("delete from dlq_applied"))
        conn.execute(text("delete from inbox"))
    ensure_topology(settings)
    purge_queues(settings.amqp_url, QUEUE, f"{QUEUE}.dlq")
    return engine


@pytest.fixture
def handler() -> Flaky:
    return Flaky()


@pytest.fixture
def consumer(settings: Settings, engine: Engine, handler: Flaky) -> Iterator[Consumer]:
    running = Consumer(settings=settings, queue=QUEUE, engine=engine, handle=handler)
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    assert running.connected.wait(15)
    yield running
    running.stop()
    thread.join(10)
    purge_queues(settings.amqp_url, QUEUE, f"{QUEUE}.dlq")


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "AMQP_URL": settings.amqp_url,
        "DATABASE_URL": settings.database_url or "",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.common.cli", "dlq", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def cli_json(settings: Settings, *args: str) -> Any:
    done = cli(settings, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def applied(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(text("select message_id from dlq_applied"))]


def verify_event(case_id: str) -> CloudEvent:
    return CloudEvent.model_validate(
        {
            "id": f"cmd-{uuid.uuid4()}",
            "source": "/test/dlq",
            "time": "2026-11-28T00:00:00Z",
            "type": "insurance.verify",
            "subject": case_id,
            "data": {"case_id": case_id, "patient": {"family_name": CANARY}},
        }
    )


def test_malformed_and_failing_messages_are_dead_lettered_with_reasons_and_never_loop(
    settings: Settings, engine: Engine, handler: Flaky, consumer: Consumer
) -> None:
    publisher = Publisher(settings)
    malformed_id = f"bad-{uuid.uuid4()}"
    body = json.dumps({"type": "insurance.verify", "data": {"family_name": CANARY}}).encode()
    publisher.publish_raw(COMMANDS, "insurance.verify", body, malformed_id)
    failing = verify_event(str(uuid.uuid4()))
    publisher.publish(COMMANDS, failing)
    publisher.close()

    letters = wait_for(
        "two dead letters", lambda: (ls := cli_json(settings, "list", QUEUE)) and len(ls) == 2 and ls
    )
    by_id = {letter["id"]: letter for letter in letters}
    assert by_id[malformed_id]["reason"].startswith("poison: not a CloudEvents 1.0 JSON envelope")
    assert by_id[malformed_id]["type"] == "insurance.verify"
    assert by_id[failing.id]["reason"].startswith("delivery_limit")
    assert by_id[failing.id]["first_seen"]
    # The first delivery and `x-delivery-limit` redeliveries, then parked: no loop.
    tries = settings.amqp_delivery_limit + 1
    assert handler.calls == tries
    time.sleep(2)
    assert handler.calls == tries
    assert len(cli_json(settings, "list", f"{QUEUE}.dlq")) == 2  # listing does not consume

    shown = cli_json(settings, "show", QUEUE, failing.id)
    assert shown["envelope"]["subject"] == failing.subject
    assert "data" not in shown["envelope"]
    assert shown["original_exchange"] == COMMANDS
    assert shown["original_routing_key"] == "insurance.verify"
    for args in (("list", QUEUE), ("show", QUEUE, failing.id), ("show", QUEUE, malformed_id)):
        assert CANARY not in cli(settings, *args).stdout


def test_replay_after_a_fix_applies_once_and_purge_drops_the_malformed(
    settings: Settings, engine: Engine, handler: Flaky, consumer: Consumer
) -> None:
    publisher = Publisher(settings)
    malformed_id = f"bad-{uuid.uuid4()}"
    publisher.publish_raw(COMMANDS, "insurance.verify", b"{not json", malformed_id)
    failing = [verify_event(str(uuid.uuid4())) for _ in range(2)]
    for event in failing:
        publisher.publish(COMMANDS, event)
    publisher.close()
    wait_for("three dead letters", lambda: len(cli_json(settings, "list", QUEUE)) == 3)

    handler.fixed = True
    first = cli_json(settings, "replay", QUEUE, "--id", failing[0].id)
    assert first["replayed"] == [failing[0].id]
    wait_for("the replayed message to be applied", lambda: applied(engine) == [failing[0].id])
    remaining = {letter["id"] for letter in cli_json(settings, "list", QUEUE)}
    assert remaining == {failing[1].id, malformed_id}

    assert set(cli_json(settings, "replay", QUEUE, "--all")["replayed"]) == remaining
    wait_for("both replays to be applied", lambda: sorted(applied(engine)) == sorted(e.id for e in failing))
    # The malformed message went straight back to the dead-letter queue with its reason: no loop.
    back = wait_for("the malformed message back in the DLQ", lambda: cli_json(settings, "list", QUEUE))
    assert [letter["id"] for letter in back] == [malformed_id]
    assert cli_json(settings, "purge", QUEUE, "--id", malformed_id)["purged"] == malformed_id
    assert cli_json(settings, "list", QUEUE) == []
    time.sleep(1)
    assert sorted(applied(engine)) == sorted(e.id for e in failing)


def test_unknown_queue_or_id_is_a_clear_error(settings: Settings, engine: Engine) -> None:
    unknown = cli(settings, "list", "nosuch")
    assert unknown.returncode != 0
    assert "no queue 'nosuch'" in unknown.stderr and "insurance" in unknown.stderr
    missing = cli(settings, "show", QUEUE, "no-such-id")
    assert missing.returncode != 0
    assert "no dead letter 'no-such-id'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_dead_letter_with_forged_headers_is_listed_and_purged_like_any_other(
    settings: Settings, engine: Engine, consumer: Consumer
) -> None:
    """A poison message keeps the headers it was published with, `x-death` included, whatever their shape:
    one forged header must not stop operators from listing, showing or purging the whole queue."""
    forged_id = f"forged-{uuid.uuid4()}"
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        props = pika.BasicProperties(
            message_id=forged_id, headers={"x-death": "forged", "x-poison-reason": 7}
        )
        conn.channel().basic_publish(COMMANDS, "insurance.verify", b"{not json", props)
    finally:
        conn.close()

    [letter] = wait_for("the dead letter", lambda: cli_json(settings, "list", QUEUE))
    assert letter["id"] == forged_id
    assert letter["reason"].startswith("poison: not a CloudEvents 1.0 JSON envelope (the body is not JSON")
    assert cli_json(settings, "show", QUEUE, forged_id)["id"] == forged_id
    assert cli_json(settings, "purge", QUEUE, "--id", forged_id)["purged"] == forged_id


def test_show_never_prints_a_body_that_is_data_without_its_envelope(
    settings: Settings, engine: Engine, consumer: Consumer
) -> None:
    """A command's data sent as the whole body (no envelope, or a binary-mode CloudEvent) is poison; `show`
    prints the envelope attributes a CloudEvent has, and only the names of the other keys."""
    bare_id = f"bare-{uuid.uuid4()}"
    body = json.dumps({"case_id": "c-1", "patient": {"family_name": CANARY}, "type": "insurance.verify"})
    publisher = Publisher(settings)
    publisher.publish_raw(COMMANDS, "insurance.verify", body.encode(), bare_id)
    publisher.close()

    wait_for("the dead letter", lambda: cli_json(settings, "list", QUEUE))
    done = cli(settings, "show", QUEUE, bare_id)
    assert done.returncode == 0, done.stderr
    assert CANARY not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["envelope"] == {"type": "insurance.verify", "other keys": ["case_id", "patient"]}
