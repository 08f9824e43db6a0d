"""The ceiling for the case workflow: a bare Temporal workflow with the same number of activities,
signals and updates as one real case, no-op bodies, on the same server (its own task queue)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

TASK_QUEUE = "bench-bare"
LOCAL_ACTIVITY_MARKER = "core_local_activity"  # the marker the SDK records for each local activity


@dataclass
class Shape:
    activities: int
    signals: int
    updates: int
    local_activities: int = 0


@activity.defn
async def noop() -> None:
    return None


@workflow.defn
class BareCase:
    """Runs `activities` no-op activities and `local_activities` no-op local activities in sequence and
    waits for `signals` signals and `updates` updates (signal `poke`, update `decide`)."""

    def __init__(self) -> None:
        self.signals = 0
        self.updates = 0

    @workflow.run
    async def run(self, shape: Shape) -> None:
        for _ in range(shape.activities):
            await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
        for _ in range(shape.local_activities):
            await workflow.execute_local_activity(noop, start_to_close_timeout=timedelta(seconds=30))
        await workflow.wait_condition(lambda: self.signals >= shape.signals and self.updates >= shape.updates)

    @workflow.signal
    def poke(self) -> None:
        self.signals += 1

    @workflow.update
    def decide(self) -> None:
        self.updates += 1


async def shape_of(client: Client, workflow_id: str) -> Shape:
    """Count what one real case did: activities scheduled (regular and local), signals received, updates
    accepted."""
    shape = Shape(activities=0, signals=0, updates=0, local_activities=0)
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            shape.activities += 1
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            shape.signals += 1
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            shape.updates += 1
        elif (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
        ):
            shape.local_activities += 1
    return shape


@contextlib.asynccontextmanager
async def bare_worker(client: Client) -> AsyncIterator[None]:
    async with Worker(client, task_queue=TASK_QUEUE, workflows=[BareCase], activities=[noop]):
        yield


async def run_bare(client: Client, workflow_id: str, shape: Shape) -> None:
    handle = await client.start_workflow(BareCase.run, shape, id=workflow_id, task_queue=TASK_QUEUE)
    for _ in range(shape.signals):
        await handle.signal(BareCase.poke)
    for _ in range(shape.updates):
        await handle.execute_update(BareCase.decide)
    await handle.result()


async def run_bare_concurrently(client: Client, shape: Shape, count: int, concurrency: int) -> list[float]:
    """`count` bare workflows, `concurrency` at a time; each one's seconds from start to completion."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    seconds: list[float] = []

    async def one(index: int) -> None:
        async with gate:
            started = loop.time()
            await run_bare(client, f"bare-{index}-{id(seconds)}", shape)
            seconds.append(loop.time() - started)

    await asyncio.gather(*(one(i) for i in range(count)))
    return seconds
