"""The event bridge: consumes `case.events` and signals `case-{subject}` with each event.

The pika consumer runs in its own thread and hands each event to the worker's asyncio loop, so up to the
prefetch count of signals are in flight at once (one at a time held the whole system to the speed of one
signal round trip). Events of one case are signalled in the order they arrived; different cases run side
by side. A message is acked, from the pika thread, only once Temporal accepted its signal; while Temporal is
unavailable the signal is retried in place with backoff, not redelivered. The workflow drops event ids it
has seen, so a redelivered message is harmless. An event for a case that is closed or unknown is acked and
dropped; a message that is not a CloudEvent, an event of a contract type whose data the case could not
read, or one Temporal refuses as invalid (over its blob size limit) is dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from typing import Any

import structlog
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from contracts.envelope import CloudEvent
from contracts.events import EVENT_TYPES
from services.common.amqp import (
    QueueConsumer,
    contract_message,
    decode_envelope,
    delivery_attempt,
    retry_backoff,
)
from services.common.config import Settings
from services.common.crashpoints import crash_point
from services.common.errors import PoisonMessage, human_size

log = structlog.get_logger(__name__)

QUEUE = "workflows.bridge"
SIGNAL_TIMEOUT_SECONDS = 30
BRIDGE_PREFETCH = 64
# Temporal's default blob size limit: a larger signal is refused on every attempt (INVALID_ARGUMENT).
SIGNAL_LIMIT_BYTES = 2 * 1024 * 1024


class EventBridge(QueueConsumer):
    # A Temporal frontend that is away (a restart, an upgrade) is waited for in place, pausing 0.5 s, 1 s ...
    # up to 10 s, for up to five minutes: a redelivery counts against the delivery limit and dead-letters the
    # event within seconds. The case's later events wait their turn meanwhile.
    unavailable_first_pause = 0.5
    unavailable_longest_pause = 10.0
    unavailable_patience = 300.0

    def __init__(self, *, settings: Settings, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(settings=settings, queue=QUEUE)
        # Signals are cheap and independent across cases: keep more of them in flight than a handler would.
        self.prefetch = max(settings.amqp_prefetch, BRIDGE_PREFETCH)
        self.client = client
        self.loop = loop
        # case id -> the lock its signals take turns on (only touched on the asyncio loop).
        self._case_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        try:
            event = decode_envelope(body, props.content_type)
            check_data(event)
            if len(body) > SIGNAL_LIMIT_BYTES:
                raise PoisonMessage(
                    f"the event is {human_size(len(body))}; a Temporal signal holds at most"
                    f" {human_size(SIGNAL_LIMIT_BYTES)} (its blob size limit)"
                )
        except PoisonMessage as exc:
            log.warning("message.poison", queue=self.queue, message_id=props.message_id, reason=str(exc))
            self._dead_letter(channel, method, props, body, str(exc))
            return
        future = asyncio.run_coroutine_threadsafe(self.deliver(event, props.headers), self.loop)
        connection = self._conn
        assert connection is not None  # noqa: S101 - a message arrives only on an open connection

        def settle_later(done: concurrent.futures.Future[bool]) -> None:
            # A closed connection refuses the callback: the broker then redelivers the message anyway.
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(
                    functools.partial(self._settle, channel, method, props, body, event, done)
                )

        future.add_done_callback(settle_later)

    def _settle(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
        event: CloudEvent,
        done: concurrent.futures.Future[bool],
    ) -> None:
        """On the pika thread: ack a signalled (or moot) event, dead-letter one Temporal refused as invalid, or
        put a failed one back after a pause."""
        if not channel.is_open:
            return  # the connection dropped: the broker redelivers the message to the next connection
        fields = {"queue": self.queue, "message_id": props.message_id, "case_id": event.subject}
        error = done.exception()
        if error is None:
            crash_point("bridge.after_signal_before_ack")
            channel.basic_ack(method.delivery_tag)
            applied = done.result()
            log.info("message.applied" if applied else "message.duplicate_dropped", **fields)
            return
        if isinstance(error, PoisonMessage):
            log.warning("message.poison", reason=str(error), **fields)
            self._dead_letter(channel, method, props, body, str(error))
            return
        log.warning("message.failed", attempt=delivery_attempt(props), error=type(error).__name__, **fields)
        connection = self._conn
        if connection is None or connection.is_closed:
            return
        connection.call_later(
            retry_backoff(props),
            lambda: channel.basic_nack(method.delivery_tag, requeue=True) if channel.is_open else None,
        )

    async def deliver(self, event: CloudEvent, headers: dict[str, Any] | None) -> bool:
        """Signal `event` after every earlier event of the same case; False if the case is not running."""
        lock, users = self._case_locks.get(event.subject) or (asyncio.Lock(), 0)
        self._case_locks[event.subject] = (lock, users + 1)
        try:
            async with lock:
                with self.message_span(event, headers):
                    return await self._signal_once_temporal_answers(event)
        finally:
            lock, users = self._case_locks[event.subject]
            if users == 1:
                del self._case_locks[event.subject]
            else:
                self._case_locks[event.subject] = (lock, users - 1)

    async def _signal_once_temporal_answers(self, event: CloudEvent) -> bool:
        waited, pause = 0.0, self.unavailable_first_pause
        while True:
            try:
                return await asyncio.wait_for(self.signal(event), SIGNAL_TIMEOUT_SECONDS)
            except RPCError as exc:
                if (
                    exc.status != RPCStatusCode.UNAVAILABLE
                    or waited >= self.unavailable_patience
                    or self._stop.is_set()
                ):
                    raise
                log.warning("temporal.unavailable", case_id=event.subject, retry_in=pause)
                await asyncio.sleep(pause)
                waited += pause
                pause = min(pause * 2, self.unavailable_longest_pause)

    async def signal(self, event: CloudEvent) -> bool:
        handle = self.client.get_workflow_handle(f"case-{event.subject}")
        try:
            await handle.signal("on_event", event)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                log.warning("bridge.case_not_running", case_id=event.subject, event_type=event.type)
                return False
            if exc.status == RPCStatusCode.INVALID_ARGUMENT:
                # Refused for what the signal is (its size, its name), so on every attempt. Temporal's
                # message names the limit, not the payload.
                raise PoisonMessage(f"Temporal refused the signal as invalid: {exc.message[:200]}") from exc
            raise
        return True


def check_data(event: CloudEvent) -> None:
    """`PoisonMessage` for an event of a contract type whose data is not that type's: the case workflow reads
    it with the contract model, and a ValidationError in workflow code fails its task on every retry, which
    holds the case for good. Field names only: the values may be PHI. Other types pass as they are."""
    if event.type in EVENT_TYPES:
        contract_message(event, EVENT_TYPES, "the case workflow")
