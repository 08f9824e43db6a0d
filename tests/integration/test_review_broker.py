"""The review service's messaging on the real broker: Consumer and OutboxRelay threads, no shortcuts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial

import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine

from contracts.envelope import CloudEvent
from services.common import migrate
from services.common.amqp import COMMANDS, EVENTS, Consumer, OutboxRelay, Publisher, connect, ensure_topology
from services.common.config import Settings
from services.common.db import make_engine
from services.review import consumer
from tests.integration.test_review_flow import match_command


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine("review", settings)
    migrate.upgrade("review", engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def review_service(settings: Settings, engine: Engine) -> Iterator[Consumer]:
    """The review process's background parts, as ServiceRuntime starts them, on this session's vhost."""
    ensure_topology(settings)
    relay = OutboxRelay(settings=settings, engine=engine, interval=0.1)
    review_consumer = Consumer(
        settings=settings,
        queue="review",
        engine=engine,
        handle=partial(consumer.handle, settings=settings),
        on_commit=relay.wake,
    )
    threads = [threading.Thread(target=part.run_forever, daemon=True) for part in (relay, review_consumer)]
    for thread in threads:
        thread.start()
    assert review_consumer.connected.wait(10), "the consumer did not connect to the broker"
    yield review_consumer
    review_consumer.stop()
    relay.stop()
    for thread in threads:
        thread.join(timeout=5)


@pytest.fixture
def channel(settings: Settings) -> Iterator[BlockingChannel]:
    conn = connect(settings)
    try:
        yield conn.channel()
    finally:
        conn.close()


def publish(settings: Settings, event: CloudEvent) -> None:
    publisher = Publisher(settings)
    try:
        publisher.publish(COMMANDS, event)
    finally:
        publisher.close()


def wait_for(
    channel: BlockingChannel, queue: str, message_id: str, timeout: float = 10.0
) -> tuple[dict, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
        elif props.message_id == message_id:
            return dict(props.headers or {}), body
    raise AssertionError(f"no message {message_id} on {queue} within {timeout} s")


def test_match_command_comes_back_as_review_offered(
    settings: Settings, review_service: Consumer, channel: BlockingChannel
) -> None:
    events = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(events, EVENTS, routing_key="review.*")
    command = match_command("obstetric", "TX")

    publish(settings, command)

    _, body = wait_for(channel, events, f"{command.id}>review.offered")
    event = CloudEvent.model_validate_json(body)
    assert (event.type, event.source, event.subject) == (
        "review.offered",
        "/services/review",
        command.subject,
    )
    assert event.data["reviewer_id"] == "spec-ob-1"
    assert event.data["subspecialty"] == "maternal_fetal_medicine"


def test_a_command_the_service_cannot_handle_is_dead_lettered_with_its_reason(
    settings: Settings, review_service: Consumer, channel: BlockingChannel
) -> None:
    offer = CloudEvent(
        id="case-x:offer-1",
        source="/workflows",
        type="review.offer",
        subject="case-x",
        time=datetime.now(UTC),
    )

    publish(settings, offer)

    headers, _ = wait_for(channel, "review.dlq", offer.id)
    assert "does not handle 'review.offer'" in headers["x-poison-reason"]
