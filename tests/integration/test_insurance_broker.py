"""The insurance service's real Consumer and OutboxRelay threads against the real broker vhost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, Coverage, InsuranceVerified, VerifyInsurance, new_event
from contracts.events import CaseCancelled
from services.common import migrate
from services.common.amqp import COMMANDS, EVENTS, Consumer, OutboxRelay, Publisher, ensure_topology
from services.common.config import Settings
from services.common.db import Inbox, make_engine
from services.insurance import consumer
from services.insurance.models import CoverageVerification


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    return engine


@pytest.fixture(scope="module")
def channel(settings: Settings) -> Iterator[BlockingChannel]:
    ensure_topology(settings)
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    yield conn.channel()
    conn.close()


@pytest.fixture(scope="module")
def events_queue(channel: BlockingChannel) -> str:
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS, routing_key="insurance.verified")
    return queue


@pytest.fixture(scope="module")
def service(settings: Settings, engine: Engine, events_queue: str) -> Iterator[None]:
    relay = OutboxRelay(settings=settings, engine=engine)
    inbox_consumer = Consumer(
        settings=settings, queue="insurance", engine=engine, handle=consumer.handle, on_commit=relay.wake
    )
    threads = [
        threading.Thread(target=t, daemon=True) for t in (relay.run_forever, inbox_consumer.run_forever)
    ]
    for thread in threads:
        thread.start()
    assert inbox_consumer.connected.wait(10), "the consumer did not connect to the broker"
    yield
    inbox_consumer.stop()
    relay.stop()
    for thread in threads:
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def publisher(settings: Settings) -> Iterator[Publisher]:
    publisher = Publisher(settings)
    yield publisher
    publisher.close()


def verify_command(coverage: Coverage) -> CloudEvent:
    case_id = f"c-{uuid.uuid4().hex[:12]}"
    cmd = VerifyInsurance(case_id=case_id, coverage=coverage, patient_state="NY")
    return new_event(
        id=f"case-{case_id}:verify-insurance-1", source="/workflows/case", data=cmd, subject=case_id
    )


def receive(channel: BlockingChannel, queue: str, message_id: str, timeout: float = 10) -> list[tuple]:
    """Every message with `message_id` on `queue` seen until one arrives (or `timeout`), acked."""
    found: list[tuple] = []
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue)
        if method is None:
            time.sleep(0.05)
            continue
        channel.basic_ack(method.delivery_tag)
        if props.message_id == message_id:
            found.append((props, body))
    return found


def drain(channel: BlockingChannel, queue: str, message_id: str) -> int:
    count = 0
    while True:
        method, props, _ = channel.basic_get(queue)
        if method is None:
            return count
        channel.basic_ack(method.delivery_tag)
        count += props.message_id == message_id


@pytest.mark.usefixtures("service")
def test_command_on_the_broker_yields_insurance_verified(
    engine: Engine, channel: BlockingChannel, events_queue: str, publisher: Publisher
) -> None:
    command = verify_command(Coverage(plan_code="ACME-PPO", member_id="ACM100200301"))
    publisher.publish(COMMANDS, command)

    [(props, body)] = receive(channel, events_queue, f"{command.id}>insurance.verified")
    event = CloudEvent.model_validate_json(body)
    assert (props.type, event.subject) == ("insurance.verified", command.subject)
    verified = InsuranceVerified.model_validate(event.data)
    assert (verified.coverage_status, verified.patient_cost) == ("covered", Decimal("131.48"))
    with Session(engine) as session:
        assert session.get(Inbox, command.id) is not None


@pytest.mark.usefixtures("service")
def test_same_command_twice_makes_one_row_and_one_event(
    engine: Engine, channel: BlockingChannel, events_queue: str, publisher: Publisher
) -> None:
    command = verify_command(Coverage(plan_code="ACME-HMO", member_id="H1"))
    sentinel = verify_command(Coverage(self_pay=True))
    publisher.publish(COMMANDS, command)
    publisher.publish(COMMANDS, command)
    # The consumer applies in order and the relay publishes in order: once the sentinel's event is out,
    # the duplicate has been dealt with.
    publisher.publish(COMMANDS, sentinel)

    event_id = f"{command.id}>insurance.verified"
    seen = receive(channel, events_queue, event_id)
    assert receive(channel, events_queue, f"{sentinel.id}>insurance.verified")
    assert len(seen) + drain(channel, events_queue, event_id) == 1
    with Session(engine) as session:
        rows = session.exec(
            select(CoverageVerification).where(CoverageVerification.case_id == command.subject)
        )
        assert [r.patient_cost for r in rows.all()] == [Decimal("40.00")]


@pytest.mark.usefixtures("service")
def test_invalid_command_is_dead_lettered_with_its_reason(
    engine: Engine, channel: BlockingChannel, publisher: Publisher
) -> None:
    command = verify_command(Coverage(self_pay=True)).model_copy(update={"data": {"case_id": "c-x"}})
    command = command.model_copy(update={"subject": "c-x", "id": f"poison-{uuid.uuid4().hex[:8]}"})
    publisher.publish(COMMANDS, command)

    [(props, _)] = receive(channel, "insurance.dlq", command.id)
    reason = props.headers["x-poison-reason"]
    assert reason.startswith("insurance.verify data is invalid (coverage: Field required")
    assert props.headers["x-original-routing-key"] == "insurance.verify"
    with Session(engine) as session:
        assert session.get(Inbox, command.id) is None
        assert (
            session.exec(select(CoverageVerification).where(CoverageVerification.case_id == "c-x")).first()
            is None
        )


@pytest.mark.usefixtures("service")
def test_case_cancelled_on_the_broker_withdraws_the_case(
    engine: Engine, channel: BlockingChannel, events_queue: str, publisher: Publisher
) -> None:
    command = verify_command(Coverage(plan_code="ACME-PPO", member_id="ACM100200301"))
    publisher.publish(COMMANDS, command)
    assert receive(channel, events_queue, f"{command.id}>insurance.verified")
    cancelled = CaseCancelled(case_id=command.subject, reason="patient withdrew", cancelled_by="staff-1")
    event = new_event(
        id=f"{command.id}:cancelled", source="/workflows/case", data=cancelled, subject=command.subject
    )
    publisher.publish(EVENTS, event)

    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        with Session(engine) as session:
            row = session.exec(
                select(CoverageVerification).where(CoverageVerification.case_id == command.subject)
            ).one()
        if row.cancelled_at is not None:
            break
        time.sleep(0.05)
    assert row is not None and row.cancelled_at is not None


@pytest.mark.usefixtures("service")
def test_a_value_the_database_cannot_hold_is_dead_lettered_at_once_with_its_reason(
    engine: Engine, channel: BlockingChannel, publisher: Publisher
) -> None:
    """A case id longer than the column: the database refuses it on every delivery, so it is not retried up
    to the delivery limit but dead-lettered on the first, saying so (and never quoting the value)."""
    case_id = "c" * 120
    cmd = VerifyInsurance(case_id=case_id, coverage=Coverage(self_pay=True), patient_state="NY")
    command = new_event(
        id=f"too-long-{uuid.uuid4().hex[:8]}", source="/workflows/case", data=cmd, subject=case_id
    )
    publisher.publish(COMMANDS, command)

    [(props, _)] = receive(channel, "insurance.dlq", command.id)
    assert "x-death" not in props.headers  # not retried up to the delivery limit
    reason = props.headers["x-poison-reason"]
    assert reason == (
        "the database refused a value of insurance.verify (StringDataRightTruncation, SQLSTATE 22001);"
        " no redelivery can store it"
    )
    with Session(engine) as session:
        assert session.get(Inbox, command.id) is None
