"""The event bridge on the real broker and Temporal server: signals of different cases are in flight side by
side, events of one case arrive in the order they were published, a failed signal is retried, a poison
message is dead-lettered and an event for an unknown case is dropped without blocking the queue."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pika
import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from contracts.envelope import CloudEvent
from services.common.amqp import EVENTS, Publisher, dead_letter_queue, ensure_topology
from services.common.config import Settings
from tests.infra import purge_queues, queue_depth
from workflows import bridge as bridge_module
from workflows.bridge import QUEUE, EventBridge

TASK_QUEUE = "bridge-test"


@workflow.defn(name="BridgeRecorder")
class Recorder:
    """Stands in for a case: records the ids of the events it is signalled with, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal
    def on_event(self, event: CloudEvent) -> None:
        self.ids.append(event.id)

    @workflow.query
    def received(self) -> list[str]:
        return self.ids


class ObservedBridge(EventBridge):
    """The real bridge, with each signal slowed a little and counted, and chosen signals failing once."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.in_flight = 0
        self.most_in_flight = 0
        self.in_flight_by_case: dict[str, int] = {}
        self.most_in_flight_for_one_case = 0
        self.fail_once: set[str] = set()
        self.failures: list[str] = []
        self.unavailable_for: dict[str, int] = {}  # event id -> signal attempts Temporal is away for

    async def signal(self, event: CloudEvent) -> bool:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        mine = self.in_flight_by_case.get(event.subject, 0) + 1
        self.in_flight_by_case[event.subject] = mine
        self.most_in_flight_for_one_case = max(self.most_in_flight_for_one_case, mine)
        try:
            await asyncio.sleep(0.1)
            if event.id in self.fail_once:
                self.fail_once.discard(event.id)
                self.failures.append(event.id)
                raise ConnectionError("Temporal frontend unavailable")
            if self.unavailable_for.get(event.id):
                self.unavailable_for[event.id] -= 1
                self.failures.append(event.id)
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
            return await super().signal(event)
        finally:
            self.in_flight -= 1
            self.in_flight_by_case[event.subject] -= 1


@pytest.fixture(scope="module")
async def bridge(temporal_env, settings: Settings) -> AsyncIterator[tuple[ObservedBridge, Client]]:  # type: ignore[no-untyped-def]
    ensure_topology(settings)
    purge_queues(settings.amqp_url, QUEUE, dead_letter_queue(QUEUE))
    client: Client = temporal_env.client
    bridge = ObservedBridge(settings=settings, client=client, loop=asyncio.get_running_loop())
    thread = threading.Thread(target=bridge.run_forever, daemon=True)
    async with Worker(
        client, task_queue=TASK_QUEUE, workflows=[Recorder], workflow_runner=UnsandboxedWorkflowRunner()
    ):
        thread.start()
        assert await asyncio.to_thread(bridge.connected.wait, 10)
        yield bridge, client
    bridge.stop()
    thread.join(5)


def event(case_id: str, n: int) -> CloudEvent:
    return CloudEvent(
        id=f"{case_id}-{n:03d}",
        source="/test/bridge",
        type="records.progress",
        subject=case_id,
        time=datetime.now(UTC),
        data={"n": n},
    )


async def start_cases(client: Client, count: int) -> list[str]:
    cases = [f"bridge-{uuid.uuid4().hex[:12]}" for _ in range(count)]
    for case_id in cases:
        await client.start_workflow(Recorder.run, id=f"case-{case_id}", task_queue=TASK_QUEUE)
    return cases


async def received(client: Client, case_id: str, count: int, timeout: float = 30) -> list[str]:
    handle = client.get_workflow_handle(f"case-{case_id}")
    deadline = time.monotonic() + timeout
    ids: list[str] = []
    while time.monotonic() < deadline:
        ids = await handle.query(Recorder.received)
        if len(ids) >= count:
            return ids
        await asyncio.sleep(0.2)
    return ids


async def test_cases_are_signalled_side_by_side_and_each_case_in_order(
    bridge: tuple[ObservedBridge, Client], settings: Settings
) -> None:
    observed, client = bridge
    cases = await start_cases(client, 12)
    publisher = Publisher(settings)
    for n in range(5):
        for case_id in cases:
            publisher.publish(EVENTS, event(case_id, n))
    publisher.close()

    for case_id in cases:
        assert await received(client, case_id, 5) == [f"{case_id}-{n:03d}" for n in range(5)]
    # 60 signals of 100 ms each: one at a time would take 6 s; side by side they overlap.
    assert observed.most_in_flight > 4
    assert observed.most_in_flight_for_one_case == 1


async def test_a_failed_signal_is_retried_and_the_case_keeps_its_order(
    bridge: tuple[ObservedBridge, Client], settings: Settings
) -> None:
    observed, client = bridge
    (case_id,) = await start_cases(client, 1)
    observed.fail_once.add(f"{case_id}-000")
    publisher = Publisher(settings)
    publisher.publish(EVENTS, event(case_id, 0))
    publisher.close()

    assert await received(client, case_id, 1) == [f"{case_id}-000"]
    assert observed.failures == [f"{case_id}-000"]


async def test_poison_is_dead_lettered_and_an_unknown_case_does_not_block(
    bridge: tuple[ObservedBridge, Client], settings: Settings
) -> None:
    _, client = bridge
    publisher = Publisher(settings)
    publisher.publish_raw(EVENTS, "records.progress", b"{not json", "poison-1")
    publisher.publish(EVENTS, event("no-such-case", 0))
    (case_id,) = await start_cases(client, 1)
    publisher.publish(EVENTS, event(case_id, 0))
    publisher.close()

    assert await received(client, case_id, 1) == [f"{case_id}-000"]
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = conn.channel()
        deadline = time.monotonic() + 10
        method = None
        while method is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(dead_letter_queue(QUEUE), auto_ack=True)
            if method is None:
                await asyncio.sleep(0.2)
        assert method is not None, "the poison message did not reach workflows.bridge.dlq"
        assert props.message_id == "poison-1"
        assert "not a CloudEvents 1.0 JSON envelope" in props.headers["x-poison-reason"]
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while queue_depth(settings.amqp_url, QUEUE) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert queue_depth(settings.amqp_url, QUEUE) == 0  # the unknown case's event was acked, not left to block


async def test_an_event_whose_data_the_case_cannot_read_is_dead_lettered_not_signalled(
    bridge: tuple[ObservedBridge, Client], settings: Settings
) -> None:
    """The case workflow reads a known event's data with its contract model: data that does not match it
    would fail the workflow's task on every attempt and hold the case, so the bridge dead-letters it."""
    _, client = bridge
    (case_id,) = await start_cases(client, 1)
    unreadable = event(case_id, 0).model_copy(
        update={"type": "review.submitted", "data": {"case_id": case_id}}
    )
    other_case = event(case_id, 1).model_copy(
        update={
            "type": "review.accepted",
            "data": {"case_id": "another", "review_id": "r", "reviewer_id": "s"},
        }
    )
    publisher = Publisher(settings)
    publisher.publish(EVENTS, unreadable)
    publisher.publish(EVENTS, other_case)
    publisher.publish(EVENTS, event(case_id, 2))
    publisher.close()

    assert await received(client, case_id, 1) == [f"{case_id}-002"]
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    reasons: dict[str, str] = {}
    try:
        channel = conn.channel()
        deadline = time.monotonic() + 10
        while len(reasons) < 2 and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(dead_letter_queue(QUEUE), auto_ack=True)
            if method is None:
                await asyncio.sleep(0.2)
            else:
                reasons[props.message_id] = props.headers["x-poison-reason"]
    finally:
        conn.close()
    assert reasons == {
        f"{case_id}-000": "review.submitted data is invalid (3 error(s): review_id, reviewer_id, agreement)",
        f"{case_id}-001": f"review.accepted is about case {case_id} but its data names another case",
    }


BRIDGE_CHECK = "the event is 2.861 MiB; a Temporal signal holds at most 2 MiB (its blob size limit)"
TEMPORAL_CHECK = "Temporal refused the signal as invalid: Blob data size exceeds limit."


@pytest.mark.parametrize(
    ("checked_up_to", "reason"),
    [
        pytest.param(bridge_module.SIGNAL_LIMIT_BYTES, BRIDGE_CHECK, id="bridge-check"),
        pytest.param(10**7, TEMPORAL_CHECK, id="temporal-check"),  # one the bridge's size check let through
    ],
)
async def test_an_event_too_large_for_a_signal_is_dead_lettered_at_once_saying_so(
    bridge: tuple[ObservedBridge, Client],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checked_up_to: int,
    reason: str,
) -> None:
    """Temporal refuses a signal over its blob size limit on every attempt: the event is dead-lettered on its
    first delivery saying so, not redelivered up to the delivery limit as if Temporal were away."""
    monkeypatch.setattr(bridge_module, "SIGNAL_LIMIT_BYTES", checked_up_to)
    _, client = bridge
    (case_id,) = await start_cases(client, 1)
    too_large = event(case_id, 0).model_copy(update={"data": {"note": "A" * 3_000_000}})
    publisher = Publisher(settings)
    publisher.publish(EVENTS, too_large)
    publisher.publish(EVENTS, event(case_id, 1))
    publisher.close()

    assert await received(client, case_id, 1) == [f"{case_id}-001"]
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = conn.channel()
        deadline = time.monotonic() + 10
        method = None
        while method is None and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(dead_letter_queue(QUEUE), auto_ack=True)
            if method is None:
                await asyncio.sleep(0.2)
    finally:
        conn.close()
    assert method is not None, "the event did not reach workflows.bridge.dlq"
    assert props.message_id == f"{case_id}-000"
    assert "x-death" not in props.headers  # not redelivered up to the delivery limit first
    assert props.headers["x-poison-reason"] == reason


async def test_an_event_waits_out_temporal_being_away_instead_of_being_dead_lettered(
    bridge: tuple[ObservedBridge, Client], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Temporal frontend that is away (a restart, an upgrade) is not the event's fault: the signal is retried
    with backoff in place, not redelivered until the delivery limit dead-letters the event."""
    monkeypatch.setattr(EventBridge, "unavailable_first_pause", 0.05)  # 0.05 s doubling: the test takes 2 s
    observed, client = bridge
    (case_id,) = await start_cases(client, 1)
    away = settings.amqp_delivery_limit + 2  # more attempts than the deliveries the broker allows
    observed.unavailable_for[f"{case_id}-000"] = away
    publisher = Publisher(settings)
    publisher.publish(EVENTS, event(case_id, 0))
    publisher.publish(EVENTS, event(case_id, 1))
    publisher.close()

    assert await received(client, case_id, 2) == [f"{case_id}-000", f"{case_id}-001"]
    assert observed.failures.count(f"{case_id}-000") == away
    assert queue_depth(settings.amqp_url, dead_letter_queue(QUEUE)) == 0
