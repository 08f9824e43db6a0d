"""The shared AMQP layer on the real broker and database: inbox, delivery limit, poison, outbox."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, CollectRecords
from contracts.envelope import new_event
from services.common.amqp import (
    COMMANDS,
    EVENTS,
    Consumer,
    OutboxRelay,
    Publisher,
    PublishFailed,
    dead_letter_queue,
    enqueue,
    ensure_topology,
)
from services.common.config import Settings
from services.common.db import Outbox, make_engine
from services.common.migrate import upgrade
from services.common.runner import ServiceRuntime


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    # Any service's migrations create the inbox and outbox; intake's are the smallest.
    engine = make_engine("intake", settings)
    upgrade("intake", engine)
    ensure_topology(settings)
    return engine


def purge(settings: Settings, *queues: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    for queue in queues:
        channel.queue_purge(queue)
    conn.close()


def collect_command(case_id: str, message_id: str | None = None) -> CloudEvent:
    data = {
        "case_id": case_id,
        "patient": {"family_name": "X", "given_name": "Y", "birth_date": "1990-01-01", "sex": "female",
                    "mrn": "1", "state": "CA"},
        "exam": {"exam_type": "pelvic", "performed_on": "2026-11-01", "facility": "F"},
    }  # fmt: skip
    return new_event(
        id=message_id or str(uuid.uuid4()),
        source="/test",
        subject=case_id,
        data=CollectRecords.model_validate(data),
    )


def run_consumer(settings: Settings, engine: Engine, queue: str, handle: Callable) -> Iterator[Consumer]:
    yield from run_consumer_with(Consumer(settings=settings, queue=queue, engine=engine, handle=handle))


def run_consumer_with(consumer: Consumer) -> Iterator[Consumer]:
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    assert consumer.connected.wait(10)
    yield consumer
    consumer.stop()
    thread.join(5)


def dlq_messages(
    settings: Settings, queue: str, timeout: float = 15
) -> list[tuple[pika.BasicProperties, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    found = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not found:
        method, props, body = channel.basic_get(dead_letter_queue(queue), auto_ack=True)
        if method is not None:
            found.append((props, body))
        else:
            time.sleep(0.2)
    conn.close()
    return found


def test_failing_handler_is_dead_lettered_after_the_delivery_limit(
    settings: Settings, engine: Engine
) -> None:
    purge(settings, "records", dead_letter_queue("records"))
    attempts: list[str] = []

    def always_fails(session: Session, event: CloudEvent) -> None:
        attempts.append(event.id)
        raise RuntimeError("database says no")

    for _ in run_consumer(settings, engine, "records", always_fails):
        Publisher(settings).publish(COMMANDS, collect_command("case-dlq", "msg-fails"))
        dead = dlq_messages(settings, "records")
    assert [props.message_id for props, _ in dead] == ["msg-fails"]
    # The first delivery plus `amqp_delivery_limit` redeliveries, then no more.
    assert len(attempts) == settings.amqp_delivery_limit + 1
    time.sleep(1)
    assert len(attempts) == settings.amqp_delivery_limit + 1


def test_malformed_message_goes_to_the_dead_letter_queue_at_once_with_its_reason(
    settings: Settings, engine: Engine
) -> None:
    purge(settings, "records", dead_letter_queue("records"))
    calls: list[str] = []
    for _ in run_consumer(settings, engine, "records", lambda s, e: calls.append(e.id)):
        Publisher(settings).publish_raw(COMMANDS, "records.collect", b'{"id": 1, "oops": true}', "msg-poison")
        dead = dlq_messages(settings, "records")
    assert calls == []
    props, body = dead[0]
    assert props.message_id == "msg-poison"
    assert "not a CloudEvents 1.0 JSON envelope" in props.headers["x-poison-reason"]
    assert body == b'{"id": 1, "oops": true}'


def test_a_redelivered_message_is_applied_once(settings: Settings, engine: Engine) -> None:
    purge(settings, "records")
    applied: list[str] = []

    def record(session: Session, event: CloudEvent) -> None:
        applied.append(event.id)

    for _ in run_consumer(settings, engine, "records", record):
        publisher = Publisher(settings)
        event = collect_command("case-dup", "msg-dup")
        publisher.publish(COMMANDS, event)
        publisher.publish(COMMANDS, event)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(applied) < 1:
            time.sleep(0.1)
        time.sleep(1)
    assert applied == ["msg-dup"]


def test_outbox_rows_are_published_only_after_commit(settings: Settings, engine: Engine) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS, routing_key="records.collect")
    relay = OutboxRelay(settings=settings, engine=engine)
    event = collect_command("case-outbox", f"outbox-{uuid.uuid4()}")

    with Session(engine) as session:
        enqueue(session, EVENTS, event)
        session.rollback()  # the change failed: nothing may be published
    assert relay.drain() == 0

    with Session(engine) as session:
        enqueue(session, EVENTS, event)
        enqueue(session, EVENTS, event)  # the same id twice in one transaction is one message
        session.commit()
    assert relay.drain() == 1
    assert relay.drain() == 0
    method, props, body = channel.basic_get(queue, auto_ack=True)
    assert props.message_id == event.id and CloudEvent.model_validate_json(body).subject == "case-outbox"
    conn.close()


def test_unroutable_publish_is_an_error_not_a_silent_loss(settings: Settings) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    exchange = f"test.unbound.{uuid.uuid4().hex[:6]}"
    conn.channel().exchange_declare(exchange, exchange_type="topic", auto_delete=False)
    try:
        with pytest.raises(PublishFailed, match="reached no queue"):
            Publisher(settings).publish_raw(exchange, "nobody.listens", b"{}", "msg-unroutable")
    finally:
        conn.channel().exchange_delete(exchange)
        conn.close()


def test_only_a_message_that_queued_a_message_wakes_the_outbox_relay(
    settings: Settings, engine: Engine
) -> None:
    """A drain that finds nothing still costs a transaction: the relay is woken for a message whose
    transaction added outbox rows (also when an autoflush wrote them early), not for every message."""
    purge(settings, "records")
    relay = OutboxRelay(settings=settings, engine=engine)
    runtime = ServiceRuntime(service="records", engine=lambda: engine, handle=None, settings=settings)
    runtime.relay = relay
    woken: list[str] = []
    runtime.on_commit(lambda: woken.append("any"))
    runtime.on_commit(lambda: woken.append("outbox"), wrote=Outbox)
    seen: list[tuple[str, bool]] = []

    def handle(session: Session, event: CloudEvent) -> None:
        if event.subject == "case-publishes":
            enqueue(session, EVENTS, collect_command("case-next", f"next-{uuid.uuid4()}"))
            session.exec(select(Outbox.id)).first()  # autoflush: the row is written before the commit

    consumer = Consumer(settings=settings, queue="records", engine=engine, handle=handle)
    runtime.consumer = consumer

    def committed() -> None:
        runtime._committed()
        seen.append(("wrote" if consumer.last_written else "nothing", relay._wake.is_set()))
        relay._wake.clear()

    consumer.on_commit = committed
    for _ in run_consumer_with(consumer):
        publisher = Publisher(settings)
        publisher.publish(COMMANDS, collect_command("case-quiet", f"quiet-{uuid.uuid4()}"))
        publisher.publish(COMMANDS, collect_command("case-publishes", f"pub-{uuid.uuid4()}"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 2:
            time.sleep(0.05)
    assert seen == [("nothing", False), ("wrote", True)]
    assert woken == ["any", "any", "outbox"]
    assert relay.drain() == 1  # the woken relay has the queued message to publish
