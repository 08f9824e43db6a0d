"""The event bridge: consumes `case.events` and signals `case-{subject}` with each event.

The pika consumer runs in its own thread; each signal is handed to the worker's asyncio loop and the
message is acked only once Temporal accepted the signal. The workflow drops event ids it has seen, so
a redelivered message is harmless. An event for a case that is closed or unknown is acked and dropped.
"""

from __future__ import annotations

import asyncio

import structlog
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from contracts.envelope import CloudEvent
from services.common.amqp import QueueConsumer
from services.common.config import Settings
from services.common.crashpoints import crash_point

log = structlog.get_logger(__name__)

QUEUE = "workflows.bridge"
SIGNAL_TIMEOUT_SECONDS = 30


class EventBridge(QueueConsumer):
    def __init__(self, *, settings: Settings, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(settings=settings, queue=QUEUE)
        self.client = client
        self.loop = loop

    def apply(self, event: CloudEvent) -> bool:
        future = asyncio.run_coroutine_threadsafe(self.signal(event), self.loop)
        applied = future.result(timeout=SIGNAL_TIMEOUT_SECONDS)
        crash_point("bridge.after_signal_before_ack")
        return applied

    async def signal(self, event: CloudEvent) -> bool:
        handle = self.client.get_workflow_handle(f"case-{event.subject}")
        try:
            await handle.signal("on_event", event)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                log.warning("bridge.case_not_running", case_id=event.subject, event_type=event.type)
                return False
            raise
        return True
