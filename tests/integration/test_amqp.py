"""The shared AMQP layer on the real broker and database: inbox, delivery limit, poison, outbox."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pika
import psycopg
import pytest
import structlog.testing
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import CloudEvent, CollectRecords
from contracts.envelope import new_event
from services.common.amqp import (
    COMMANDS,
    ENVELOPE_CONTENT_TYPE,
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
from services.common.db import Inbox, Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.migrate import upgrade
from services.common.runner import ServiceRuntime
from tests.infra import BASE_DATABASE_URL, queue_depth, wait_until


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
    relay = OutboxRelay(settings=settings, engine=engine)
    while relay.drain():  # rows earlier tests of this session left go out first, before our queue is bound
        pass
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS, routing_key="records.collect")
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
        # One after the other: messages that arrive together are applied (and wake) as one batch.
        for count, case in enumerate(("case-quiet", "case-publishes"), start=1):
            publisher.publish(COMMANDS, collect_command(case, f"{case}-{uuid.uuid4()}"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(seen) < count:
                time.sleep(0.05)
    assert seen == [("nothing", False), ("wrote", True)]
    assert woken == ["any", "any", "outbox"]
    assert relay.drain() == 1  # the woken relay has the queued message to publish


def effects(engine: Engine, ids: list[str]) -> list[str]:
    """The effect rows (outbox messages `{id}>effect`) the handler below committed, in commit order."""
    wanted = [f"{i}>effect" for i in ids]
    with Session(engine) as session:
        rows = session.exec(
            select(Outbox.message_id).where(col(Outbox.message_id).in_(wanted)).order_by(col(Outbox.id))
        ).all()
    return [row.removesuffix(">effect") for row in rows]


def write_effect(session: Session, event: CloudEvent) -> None:
    enqueue(session, EVENTS, collect_command(event.subject, f"{event.id}>effect"))


def test_messages_that_arrive_together_are_applied_in_order_in_fewer_transactions(
    settings: Settings, engine: Engine
) -> None:
    """A consumer that is behind applies what arrived together in one transaction and one ack, in order,
    each exactly once, a redelivered duplicate in the same batch included."""
    purge(settings, "records")
    ids = [f"batch-{n}-{uuid.uuid4()}" for n in range(12)]
    publisher = Publisher(settings)
    for message_id in ids:
        publisher.publish(COMMANDS, collect_command("case-batch", message_id))
    publisher.publish(COMMANDS, collect_command("case-batch", ids[3]))  # a redelivered duplicate
    transactions: list[tuple[str, int]] = []

    def handle(session: Session, event: CloudEvent) -> None:
        write_effect(session, event)
        transactions.append((event.id, session.exec(text("select txid_current()")).one()[0]))

    for _ in run_consumer(settings, engine, "records", handle):
        wait_until(
            lambda: len(effects(engine, ids)) == len(ids) and queue_depth(settings.amqp_url, "records") == 0
        )
    assert effects(engine, ids) == ids  # all of them, once each, in the order they were published
    assert queue_depth(settings.amqp_url, "records") == 0  # and every message, the duplicate too, was acked
    assert [message_id for message_id, _ in transactions] == ids
    assert len({txid for _, txid in transactions}) < len(ids)  # several messages shared a transaction


def test_a_bad_message_among_others_is_dead_lettered_alone_and_the_rest_apply_once(
    settings: Settings, engine: Engine
) -> None:
    purge(settings, "records", dead_letter_queue("records"))
    ids = [f"mixed-{n}-{uuid.uuid4()}" for n in range(8)]
    poison, flaky = ids[2], ids[5]
    failed: list[str] = []

    def handle(session: Session, event: CloudEvent) -> None:
        write_effect(session, event)
        session.flush()  # the effect is written before the failure: it must be rolled back with it
        if event.id == poison:
            raise PoisonMessage("records.collect data is invalid (test)")
        if event.id == flaky and flaky not in failed:
            failed.append(flaky)
            raise RuntimeError("the database went away once")

    publisher = Publisher(settings)
    for message_id in ids:
        publisher.publish(COMMANDS, collect_command("case-mixed", message_id))
    publisher.publish_raw(COMMANDS, "records.collect", b"not json", f"garbled-{uuid.uuid4()}")
    for _ in run_consumer(settings, engine, "records", handle):
        wait_until(
            lambda: (
                len(effects(engine, ids)) == len(ids) - 1 and queue_depth(settings.amqp_url, "records") == 0
            )
        )
        dead = dlq_messages(settings, "records")
        dead += dlq_messages(settings, "records", timeout=3)
    applied = effects(engine, ids)
    assert sorted(applied) == sorted(i for i in ids if i != poison)  # each once, the poison's never
    assert [i for i in applied if i != flaky] == [i for i in ids if i not in (poison, flaky)]  # in order
    assert failed == [flaky]
    reasons = {props.message_id: props.headers["x-poison-reason"] for props, _ in dead}
    assert reasons[poison] == "records.collect data is invalid (test)"
    assert any("not a CloudEvents 1.0 JSON envelope" in r for r in reasons.values())
    assert len(reasons) == 2


def test_a_handler_that_rolls_its_session_back_loses_none_of_the_messages_before_it(
    settings: Settings, engine: Engine
) -> None:
    """A handler shared with an API path may roll the session back (records' upload check did): in a
    batch that would drop the work of the messages applied before it in the same transaction."""
    purge(settings, "records")
    ids = [f"rollback-{n}-{uuid.uuid4()}" for n in range(10)]
    rolls_back = set(ids[3::4])

    def handle(session: Session, event: CloudEvent) -> None:
        if event.id in rolls_back:
            session.rollback()
        write_effect(session, event)

    publisher = Publisher(settings)
    for message_id in ids:
        publisher.publish(COMMANDS, collect_command("case-rollback", message_id))
    for _ in run_consumer(settings, engine, "records", handle):
        wait_until(
            lambda: len(effects(engine, ids)) == len(ids) and queue_depth(settings.amqp_url, "records") == 0
        )
    assert effects(engine, ids) == ids
    assert queue_depth(settings.amqp_url, "records") == 0


def test_a_batch_of_slow_messages_commits_and_acks_in_parts(settings: Settings, engine: Engine) -> None:
    """Slow handlers (a payer's answer, a PDF) must not hold one transaction and its locks, nor the
    connection's heartbeats, for a whole prefetch of messages: a batch stops taking messages after its
    time budget, commits and acks, and the rest start the next batch."""
    purge(settings, "records")
    ids = [f"slow-{n}-{uuid.uuid4()}" for n in range(8)]
    transactions: list[tuple[str, int]] = []

    def slow(session: Session, event: CloudEvent) -> None:
        time.sleep(0.25)
        write_effect(session, event)
        transactions.append((event.id, session.exec(text("select txid_current()")).one()[0]))

    publisher = Publisher(settings)
    for message_id in ids:
        publisher.publish(COMMANDS, collect_command("case-slow", message_id))
    consumer = Consumer(settings=settings, queue="records", engine=engine, handle=slow)
    consumer.batch_seconds = 0.3
    for _ in run_consumer_with(consumer):
        wait_until(
            lambda: len(effects(engine, ids)) == len(ids) and queue_depth(settings.amqp_url, "records") == 0
        )
    assert effects(engine, ids) == ids
    assert queue_depth(settings.amqp_url, "records") == 0
    per_transaction = Counter(txid for _, txid in transactions)
    assert max(per_transaction.values()) <= 2  # 0.25 s each against a 0.3 s budget
    assert len(per_transaction) < len(ids)  # and still batched


def test_a_message_another_replica_is_applying_is_applied_there_only(
    settings: Settings, engine: Engine
) -> None:
    """Two replicas of a service may get the same message (a redelivery after a lost ack). The one that
    claims it second waits for the first's transaction and then drops it; if the first rolls back, the
    second applies it."""
    applied: list[str] = []

    def handle(session: Session, event: CloudEvent) -> None:
        applied.append(event.id)
        write_effect(session, event)

    second = Consumer(settings=settings, queue="records", engine=engine, handle=handle)
    for outcome in ("commits", "rolls back"):
        message = collect_command("case-replicas", f"replica-{uuid.uuid4()}")
        applied.clear()
        result: list[bool] = []
        with Session(engine) as holding:
            # The first replica is applying it: its inbox row is written, not yet committed.
            holding.add(Inbox(message_id=message.id, queue="records", message_type=message.type))
            holding.flush()
            other = threading.Thread(target=lambda: result.append(second.apply(message)))  # noqa: B023
            other.start()
            other.join(1.5)
            assert other.is_alive(), "the second replica did not wait for the first one's transaction"
            if outcome == "commits":
                write_effect(holding, message)
                holding.commit()
            else:
                holding.rollback()
        other.join(10)
        if outcome == "commits":
            assert result == [False] and applied == [], "the second replica applied it again"
        else:
            assert result == [True] and applied == [message.id], "the second replica dropped it"
        assert effects(engine, [message.id]) == [message.id]


def test_a_handler_that_rolls_back_still_leaves_its_message_in_the_inbox(
    settings: Settings, engine: Engine
) -> None:
    """A message applied alone whose handler rolled the session back (and then did its work) is still
    recorded as applied: a redelivery is dropped, not applied twice."""
    applied: list[str] = []

    def handle(session: Session, event: CloudEvent) -> None:
        session.rollback()
        applied.append(event.id)
        write_effect(session, event)

    consumer = Consumer(settings=settings, queue="records", engine=engine, handle=handle)
    message = collect_command("case-rolled-back", f"rolled-back-{uuid.uuid4()}")
    assert consumer.apply(message) is True
    assert consumer.apply(message) is False
    assert consumer.apply_batch([message, message]) == [False, False]
    assert applied == [message.id]
    assert effects(engine, [message.id]) == [message.id]


def test_a_message_that_is_no_cloudevent_is_dead_lettered_at_once_saying_what_is_wrong(
    settings: Settings, engine: Engine
) -> None:
    """Bodies that no redelivery can mend: each reaches the dead-letter queue on its first delivery with a
    reason naming what is wrong, also where pydantic's error names no field (the body as a whole)."""
    purge(settings, "records", dead_letter_queue("records"))
    envelope = collect_command("case-no-envelope").model_dump(mode="json")
    no_specversion = {k: v for k, v in envelope.items() if k != "specversion"}
    long_type = {**envelope, "type": "records." + "a" * 120}  # longer than the inbox's message_type
    bodies = {
        "not-json": (b"not json", "application/cloudevents+json"),
        "not-utf8": (b'{"id": "\xff\xfe"}', "application/cloudevents+json"),
        "array": (b"[1, 2]", "application/cloudevents+json"),
        "xml": (b"<event/>", "application/xml"),
        "no-specversion": (json.dumps(no_specversion).encode(), "application/cloudevents+json"),
        "long-type": (json.dumps(long_type).encode(), "application/cloudevents+json"),
    }
    calls: list[str] = []
    reasons: dict[str, str] = {}
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()

    def all_dead() -> bool:
        method, props, _ = channel.basic_get(dead_letter_queue("records"), auto_ack=True)
        if method is not None:
            assert "x-death" not in props.headers, (
                f"{props.message_id} was retried before it was dead-lettered"
            )
            reasons[props.message_id] = props.headers["x-poison-reason"]
        return len(reasons) == len(bodies)

    for _ in run_consumer(settings, engine, "records", lambda s, e: calls.append(e.id)):
        for message_id, (body, content_type) in bodies.items():
            props = pika.BasicProperties(message_id=message_id, content_type=content_type, delivery_mode=2)
            channel.basic_publish(COMMANDS, "records.collect", body, props)
        wait_until(all_dead, "every message dead-lettered")
    conn.close()
    assert calls == []
    assert reasons["not-json"].endswith("(the body is not JSON: expected ident at line 1 column 2)")
    assert "(the body is not UTF-8: byte 8 of 12 is not valid)" in reasons["not-utf8"]
    assert reasons["array"].endswith("(the body is a JSON array, not an object)")
    assert "sent as content type 'application/xml'" in reasons["xml"]
    assert reasons["no-specversion"].endswith("(bad fields: specversion)")
    assert reasons["long-type"].endswith("(bad fields: type)")


def test_a_cloudevent_sent_with_a_content_type_it_is_not_is_dead_lettered_at_once_saying_so(
    settings: Settings, engine: Engine
) -> None:
    """A well-formed envelope was applied whatever content type it came with: `application/json` (binary
    mode, whose body is the data alone), a batch, or an envelope whose `datacontenttype` says its data is not
    JSON. Per CloudEvents' AMQP binding only `application/cloudevents+json` is structured mode, the one mode
    read here; what our publishers send (that type, or none from an operator's hand) is still applied."""
    purge(settings, "records", dead_letter_queue("records"))
    xml_data = collect_command("case-content-type").model_copy(update={"datacontenttype": "application/xml"})
    sent = {
        "binary": ("application/json", None, "binary mode"),
        "batch": ("application/cloudevents-batch+json", None, "a batch of events"),
        "utf-16": ("application/cloudevents+json; charset=utf-16", None, "charset other than UTF-8"),
        "xml-data": (ENVELOPE_CONTENT_TYPE, xml_data, "says its data is 'application/xml'"),
        "ours": (ENVELOPE_CONTENT_TYPE, None, None),
        "ours-charset": ("Application/CloudEvents+JSON; charset=UTF-8", None, None),
        "no-type": (None, None, None),
    }
    ids = {name: f"ct-{name}-{uuid.uuid4()}" for name in sent}
    applied: list[str] = []
    reasons: dict[str, str] = {}
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()

    def all_dead() -> bool:
        method, props, _ = channel.basic_get(dead_letter_queue("records"), auto_ack=True)
        if method is not None:
            assert "x-death" not in props.headers, (
                f"{props.message_id} was retried before it was dead-lettered"
            )
            reasons[props.message_id] = props.headers["x-poison-reason"]
        return len(reasons) == 4

    def handle(session: Session, event: CloudEvent) -> None:
        applied.append(event.id)

    for _ in run_consumer(settings, engine, "records", handle):
        for name, (content_type, event, _) in sent.items():  # together: the batch path reads them
            body = (event or collect_command("case-content-type")).model_copy(update={"id": ids[name]})
            props = pika.BasicProperties(message_id=ids[name], content_type=content_type, delivery_mode=2)
            channel.basic_publish(COMMANDS, "records.collect", body.to_bytes(), props)
        wait_until(all_dead, "four messages dead-lettered")
        wait_until(lambda: len(applied) == 3, "three messages applied")
    conn.close()
    assert sorted(applied) == sorted(ids[name] for name in ("ours", "ours-charset", "no-type"))
    for name, (_, _, says) in sent.items():
        if says:
            assert says in reasons[ids[name]], reasons[ids[name]]
    assert reasons[ids["binary"]].startswith(
        "not a CloudEvents 1.0 JSON envelope (sent as content type 'application/json', "
        "not application/cloudevents+json"
    )
    assert "content type application/cloudevents+json" in reasons[ids["binary"]]  # what to send instead


@contextlib.contextmanager
def database_down(settings: Settings) -> Iterator[None]:
    """The session's database refuses connections and its open ones are cut, until the block ends."""
    name = urlsplit(settings.database_url or "").path.lstrip("/")
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_message_waits_out_a_database_outage_and_is_applied_once(
    settings: Settings, engine: Engine
) -> None:
    """A database restart is not the message's fault: the message is held and retried with backoff while
    the database is away, not redelivered until the delivery limit dead-letters it."""
    purge(settings, "records", dead_letter_queue("records"))
    ids = [f"outage-{n}-{uuid.uuid4()}" for n in range(2)]
    # Logs captured, not rendered: rendering a traceback takes seconds here, which would pace the retries.
    with structlog.testing.capture_logs() as logs:
        for _ in run_consumer(settings, engine, "records", write_effect):
            with database_down(settings):
                publisher = Publisher(settings)
                for message_id in ids:
                    publisher.publish(COMMANDS, collect_command("case-outage", message_id))
                time.sleep(4)  # longer than the redeliveries up to the delivery limit take
            wait_until(lambda: len(effects(engine, ids)) == len(ids), "both messages applied", timeout=20)
            assert queue_depth(settings.amqp_url, "records") == 0
    assert any(line["event"] == "database.unavailable" for line in logs)
    assert effects(engine, ids) == ids
    assert queue_depth(settings.amqp_url, dead_letter_queue("records")) == 0


def test_a_failing_message_with_a_forged_delivery_count_does_not_stop_the_consumer(
    settings: Settings, engine: Engine
) -> None:
    """The broker sets `x-delivery-count` on redeliveries only: on a first delivery it is whatever the
    publisher wrote. Reading it to pace the retry of a failed message must not end the consumer's thread."""
    purge(settings, "records", dead_letter_queue("records"))
    forged, after = collect_command("case-forged", f"forged-{uuid.uuid4()}"), f"after-{uuid.uuid4()}"
    failed: list[str] = []

    def handle(session: Session, event: CloudEvent) -> None:
        if event.id == forged.id and not failed:
            failed.append(event.id)
            raise RuntimeError("the database went away once")
        write_effect(session, event)

    consumer = Consumer(settings=settings, queue="records", engine=engine, handle=handle)
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    assert consumer.connected.wait(10)
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        props = pika.BasicProperties(message_id=forged.id, headers={"x-delivery-count": "many"})
        conn.channel().basic_publish(COMMANDS, "records.collect", forged.to_bytes(), props)
        Publisher(settings).publish(COMMANDS, collect_command("case-forged", after))
        wait_until(lambda: len(effects(engine, [forged.id, after])) == 2, "both messages applied")
        assert thread.is_alive()
    finally:
        conn.close()
        consumer.stop()
        thread.join(5)
    assert failed == [forged.id]
