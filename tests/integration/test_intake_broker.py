"""The intake consumer on the real broker and database: commands and events it cannot apply reach
`intake.dlq` on their first delivery, with a reason that says what is wrong."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine

from contracts import CloudEvent, new_event
from contracts.commands import DeliverReport
from contracts.events import CaseCancelled
from services.common import migrate
from services.common.amqp import COMMANDS, EVENTS, Consumer, Publisher, dead_letter_queue, ensure_topology
from services.common.config import Settings
from services.common.db import make_engine
from services.intake import consumer
from tests.infra import purge_queues

DLQ = dead_letter_queue("intake")


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("intake", settings)
    migrate.upgrade("intake", engine)
    return engine


@pytest.fixture(scope="module")
def channel(settings: Settings, engine: Engine) -> Iterator[BlockingChannel]:
    """A channel to read `intake.dlq` with, while the intake consumer runs as the service runs it."""
    ensure_topology(settings)
    purge_queues(settings.amqp_url, "intake", DLQ)
    intake = Consumer(settings=settings, queue="intake", engine=engine, handle=consumer.handle)
    thread = threading.Thread(target=intake.run_forever, daemon=True)
    thread.start()
    assert intake.connected.wait(10), "the consumer did not connect to the broker"
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    yield conn.channel()
    conn.close()
    intake.stop()
    thread.join(timeout=5)


def dead_letter(channel: BlockingChannel, message_id: str, timeout: float = 10) -> pika.BasicProperties:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, _ = channel.basic_get(DLQ, auto_ack=True)
        if method is None:
            time.sleep(0.05)
        elif props.message_id == message_id:
            return props
    raise AssertionError(f"{message_id} did not reach {DLQ} within {timeout:g} s")


def publish(settings: Settings, exchange: str, event: CloudEvent) -> None:
    publisher = Publisher(settings)
    publisher.publish(exchange, event)
    publisher.close()


def test_a_report_for_a_case_intake_does_not_have_is_dead_lettered_at_once(
    settings: Settings, channel: BlockingChannel
) -> None:
    case_id = str(uuid.uuid4())
    command = DeliverReport(
        case_id=case_id, report_id="r-1", pdf_url="https://x/r.pdf", fhir_url="https://x/r"
    )
    event = new_event(id=f"deliver-{uuid.uuid4()}", source="/test", data=command, subject=case_id)
    publish(settings, COMMANDS, event)

    props = dead_letter(channel, event.id)
    assert "x-death" not in props.headers  # not redelivered up to the delivery limit first
    assert (
        props.headers["x-poison-reason"] == f"report.deliver names case {case_id}, which intake does not have"
    )


def test_an_event_whose_data_names_another_case_is_dead_lettered(
    settings: Settings, channel: BlockingChannel
) -> None:
    """case.cancelled for one case carrying another's id would cancel one case and withdraw the other's
    webhooks; the other services refuse such a message, intake did too little."""
    cancelled = CaseCancelled(case_id=str(uuid.uuid4()), reason="withdrawn", cancelled_by="staff-1")
    event = new_event(id=f"cancel-{uuid.uuid4()}", source="/test", data=cancelled, subject=str(uuid.uuid4()))
    publish(settings, EVENTS, event)

    props = dead_letter(channel, event.id)
    assert props.headers["x-poison-reason"] == (
        f"case.cancelled is about case {event.subject} but its data names another case"
    )


def test_invalid_data_is_dead_lettered_naming_the_bad_fields(
    settings: Settings, channel: BlockingChannel
) -> None:
    case_id = str(uuid.uuid4())
    event = CloudEvent(
        id=f"status-{uuid.uuid4()}",
        source="/test",
        type="case.status_changed",
        subject=case_id,
        time=datetime.now(UTC),
        data={"case_id": case_id, "status": "no-such-status"},
    )
    publish(settings, EVENTS, event)

    props = dead_letter(channel, event.id)
    assert props.headers["x-poison-reason"] == (
        "case.status_changed data is invalid (3 error(s): status, previous, at)"
    )
