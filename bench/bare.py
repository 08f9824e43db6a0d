"""The ceiling for the case workflow: a bare Temporal workflow with the same number of activities,
signals and updates as one real case, no-op bodies, on the same server (its own task queue).

Two ways to drive it. `run_bare`: the client sends every signal and update right after the start, so the
server folds them into a few workflow tasks (the ceiling of the verdict). `run_paced`: each signal or update
is sent only when the bare workflow has run the local activities that followed the one before it in the real
case, as a case's answers come only after its commands went out; a workflow task per step, as a case has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker, WorkflowRunner

TASK_QUEUE = "bench-bare"
LOCAL_ACTIVITY_MARKER = "core_local_activity"  # the marker the SDK records for each local activity


@dataclass
class Step:
    """What one real case did after its start, or after one signal or update: local activities and
    activities, in this order, before the next signal or update arrived."""

    trigger: str  # "start", "signal" or "update"
    local_activities: int = 0
    activities: int = 0


@dataclass
class Shape:
    """One real case's history as steps: its start, then each signal or update, with what followed it."""

    steps: list[Step] = field(default_factory=list)

    @property
    def activities(self) -> int:
        return sum(step.activities for step in self.steps)

    @property
    def local_activities(self) -> int:
        return sum(step.local_activities for step in self.steps)

    @property
    def signals(self) -> int:
        return sum(step.trigger == "signal" for step in self.steps)

    @property
    def updates(self) -> int:
        return sum(step.trigger == "update" for step in self.steps)

    def describe_steps(self) -> str:
        return " ".join(f"{s.trigger[:2]}{s.local_activities + s.activities}" for s in self.steps)


# workflow id -> one future per step, resolved by the step's last activity (the paced driver waits on it).
# Only the bench process touches it: the bare worker runs there, on the driver's event loop.
STEP_DONE: dict[str, list[asyncio.Future[None]]] = {}


@activity.defn
async def noop() -> None:
    return None


@activity.defn
async def noop_step(workflow_id: str, step: int) -> None:
    """No-op, and the paced driver may send the next signal: the step's last activity has run."""
    done = STEP_DONE.get(workflow_id)
    if done is not None and not done[step].done():
        done[step].set_result(None)


@workflow.defn
class BareCase:
    """Runs `activities` no-op activities and `local_activities` no-op local activities in sequence and
    waits for `signals` signals and `updates` updates (signal `poke`, update `decide`)."""

    def __init__(self) -> None:
        self.signals = 0
        self.updates = 0

    @workflow.run
    async def run(self, shape: Shape) -> None:
        signals, updates = shape.signals, shape.updates
        for _ in range(shape.activities):
            await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
        for _ in range(shape.local_activities):
            await workflow.execute_local_activity(noop, start_to_close_timeout=timedelta(seconds=30))
        await workflow.wait_condition(lambda: self.signals >= signals and self.updates >= updates)

    @workflow.signal
    def poke(self) -> None:
        self.signals += 1

    @workflow.update
    def decide(self) -> None:
        self.updates += 1


@workflow.defn
class BarePacedCase:
    """Step by step: waits for the step's signal or update (the first step runs at the start), then runs its
    activities in sequence, the last one telling the driver."""

    def __init__(self) -> None:
        self.triggers = 1  # the start

    @workflow.run
    async def run(self, steps: list[Step], hold: bool = False) -> None:
        """`hold`: after the last step, wait (for a trigger that never comes) instead of completing, as a
        case does that waits for its records."""
        workflow_id, timeout = workflow.info().workflow_id, timedelta(seconds=30)
        for index, step in enumerate(steps):
            await workflow.wait_condition(lambda i=index: self.triggers > i)  # type: ignore[misc]
            total = step.local_activities + step.activities
            for n in range(total):
                last = n == total - 1
                chosen, args = (noop_step, [workflow_id, index]) if last else (noop, [])
                if n < step.local_activities:
                    await workflow.execute_local_activity(chosen, args=args, start_to_close_timeout=timeout)
                else:
                    await workflow.execute_activity(chosen, args=args, start_to_close_timeout=timeout)
        if hold:
            await workflow.wait_condition(lambda: self.triggers > len(steps))

    @workflow.signal
    def poke(self) -> None:
        self.triggers += 1

    @workflow.update
    def decide(self) -> None:
        self.triggers += 1


async def shape_of(client: Client, workflow_id: str) -> Shape:
    """Count what one real case did: activities scheduled (regular and local), signals received, updates
    accepted."""
    steps = [Step("start")]
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            steps[-1].activities += 1
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            steps.append(Step("signal"))
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            steps.append(Step("update"))
        elif (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
        ):
            steps[-1].local_activities += 1
    return Shape(steps)


@contextlib.asynccontextmanager
async def bare_worker(client: Client, runner: WorkflowRunner) -> AsyncIterator[None]:
    """`runner`: the one the system's worker uses, so that both run workflow code the same way."""
    async with Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[BareCase, BarePacedCase],
        activities=[noop, noop_step],
        workflow_runner=runner,
    ):
        yield


async def run_bare(client: Client, workflow_id: str, shape: Shape) -> None:
    handle = await client.start_workflow(BareCase.run, shape, id=workflow_id, task_queue=TASK_QUEUE)
    for _ in range(shape.signals):
        await handle.signal(BareCase.poke)
    for _ in range(shape.updates):
        await handle.execute_update(BareCase.decide)
    await handle.result()


async def start_paced(
    client: Client, workflow_id: str, steps: list[Step], *, hold: bool = False
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Start a paced bare workflow; returns what drives the rest of its steps (and, unless `hold`, waits
    for its result)."""
    loop = asyncio.get_running_loop()
    done = STEP_DONE[workflow_id] = [loop.create_future() for _ in steps]
    try:
        handle = await client.start_workflow(
            BarePacedCase.run, args=[steps, hold], id=workflow_id, task_queue=TASK_QUEUE
        )
    except BaseException:
        del STEP_DONE[workflow_id]
        raise

    async def drive() -> None:
        try:
            for index, step in enumerate(steps):
                if step.trigger == "signal":
                    await handle.signal(BarePacedCase.poke)
                elif step.trigger == "update":
                    await handle.execute_update(BarePacedCase.decide)
                if step.local_activities + step.activities:
                    await done[index]
            if not hold:
                await handle.result()
        finally:
            del STEP_DONE[workflow_id]

    return drive


async def run_paced(client: Client, workflow_id: str, shape: Shape) -> None:
    drive = await start_paced(client, workflow_id, shape.steps)
    await drive()


async def run_bare_concurrently(
    client: Client, shape: Shape, count: int, concurrency: int, *, paced: bool = False
) -> list[float]:
    """`count` bare workflows, `concurrency` at a time; each one's seconds from start to completion."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    seconds: list[float] = []
    run = run_paced if paced else run_bare

    async def one(index: int) -> None:
        async with gate:
            started = loop.time()
            await run(client, f"bare-{'paced-' if paced else ''}{index}-{id(seconds)}", shape)
            seconds.append(loop.time() - started)

    await asyncio.gather(*(one(i) for i in range(count)))
    return seconds
