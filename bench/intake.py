"""`intake`: POST /v1/cases at 32 concurrent for 30 s vs raw client.start_workflow at the same concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from temporalio.client import Client

from bench import bare
from bench.cases import case_request
from bench.result import Result
from bench.server_work import ServerWork
from bench.stats import ms, percentile
from bench.system import CpuUse, System
from services.intake.handlers import workflow_id
from workflows.worker import workflow_runner

TARGET, P99_LIMIT_MS = 0.7, 250.0
HELD_FOR = 300.0  # seconds the held cases may take to catch up on their first steps once the worker runs


@contextlib.asynccontextmanager
async def first_steps_held(system: System, client: Client) -> AsyncIterator[None]:
    """The worker stopped (SIGSTOP) for the block: the cases created in it take no first step until it
    ends. Then the worker runs again, and this returns once every case has taken its first step (none is
    left at `intake`), so the next measurement does not compete with them."""
    worker = system.pid("worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker, signal.SIGCONT)
    deadline = time.monotonic() + HELD_FOR
    while (await client.count_workflows('CaseStatus="intake"')).count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the held cases did not take their first steps within {HELD_FOR:.0f} s")
        await asyncio.sleep(1)


async def closed_loop(call: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> list[float]:
    """`concurrency` callers, each calling again as soon as its call returns, for `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    latencies: list[float] = []

    async def caller() -> None:
        while loop.time() < deadline:
            started = loop.time()
            await call()
            latencies.append(loop.time() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


async def measure(system: System, concurrency: int, seconds: float) -> Result:
    url = f"{system.settings.intake_url}/v1/cases"
    client = await Client.connect(
        system.settings.temporal_address, namespace=system.settings.temporal_namespace
    )
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, headers=system.headers, limits=limits) as http:
        created: list[str] = []

        async def post_case() -> None:
            response = await http.post(url, json=case_request(system))
            if response.status_code != 201:
                raise RuntimeError(f"intake answered {response.status_code}: {response.text[:300]}")
            created.append(response.json()["case_id"])

        await closed_loop(post_case, concurrency, min(seconds, 2))  # warm-up
        work = await ServerWork(system).begin()
        started = time.monotonic()
        with CpuUse(system) as cpu:
            api = await closed_loop(post_case, concurrency, seconds)
            api_rate = len(api) / (time.monotonic() - started)
            await work.end()  # the cases' first steps, done once the server's counters settle, count too
        shaped_by = created[-1]  # a case of the run: the paced ceiling does what it did

        # What the API adds to a start: the same POSTs while no case takes its first steps (taken after
        # the window, not counted). Half as long: the held cases' first steps are caught up after it.
        async with first_steps_held(system, client):
            started = time.monotonic()
            with CpuUse(system) as held_cpu:
                held = await closed_loop(post_case, concurrency, seconds / 2)
                held_rate = len(held) / (time.monotonic() - started)

    shape = bare.Shape()  # no activities, signals or updates

    async def start_workflow() -> None:
        # No worker polls this task queue: the ceiling is the server accepting the start, as intake needs.
        await client.start_workflow("BareCase", shape, id=f"raw-{uuid.uuid4()}", task_queue="bench-raw")

    raw_work = await ServerWork(system).begin()
    started = time.monotonic()
    with CpuUse(system) as raw_cpu:
        raw = await closed_loop(start_workflow, concurrency, seconds)
        raw_rate = len(raw) / (time.monotonic() - started)
        await raw_work.end()

    # The paced ceiling: the bare workflow doing what a case did in the run (the steps its history shows, a
    # signal sent once the step before it ran, as the insurance answer comes once the check was asked for),
    # started at the same concurrency; the callers wait for the start only, as intake's callers do.
    first_steps = (await bare.shape_of(client, workflow_id(shaped_by))).steps
    drivers: set[asyncio.Task[None]] = set()

    async def start_paced() -> None:
        drive = await bare.start_paced(client, f"raw-paced-{uuid.uuid4()}", first_steps, hold=True)
        task = asyncio.create_task(drive())
        drivers.add(task)
        task.add_done_callback(drivers.discard)

    async with bare.bare_worker(client, workflow_runner(system.settings)):
        await closed_loop(start_paced, concurrency, min(seconds, 2))  # warm-up
        await asyncio.gather(*drivers)
        paced_work = await ServerWork(system).begin()
        started = time.monotonic()
        with CpuUse(system) as paced_cpu:
            paced = await closed_loop(start_paced, concurrency, seconds)
            paced_rate = len(paced) / (time.monotonic() - started)
            await asyncio.gather(*drivers)  # the first steps may lag behind the starts: they count too
            await paced_work.end()

    ratio = api_rate / raw_rate
    p99 = ms(percentile(api, 0.99))
    cpu_ms, raw_cpu_ms = cpu.per_unit(len(api)), raw_cpu.per_unit(len(raw))
    paced_cpu_ms = paced_cpu.per_unit(len(paced))
    held_cpu_ms = held_cpu.per_unit(len(held))
    steps = bare.Shape(first_steps).describe_steps()
    return Result(
        name="intake",
        what=f"POST /v1/cases, {concurrency} concurrent for {seconds:.0f} s",
        ceiling="client.start_workflow at the same concurrency",
        ratio=ratio,
        target=f">={TARGET}, p99<{P99_LIMIT_MS:.0f}ms",
        ok=ratio >= TARGET and p99 < P99_LIMIT_MS,
        figures={
            "req/s": round(api_rate, 1),
            "p50 ms": ms(percentile(api, 0.5)),
            "p99 ms": p99,
            "ceiling starts/s": round(raw_rate, 1),
            "ceiling p50 ms": ms(percentile(raw, 0.5)),
            "ceiling p99 ms": ms(percentile(raw, 0.99)),
            "CPU ms/req": round(sum(cpu_ms.values()), 1),
            "ceiling CPU ms/start": round(sum(raw_cpu_ms.values()), 1),
            "paced ceiling starts/s": round(paced_rate, 1),
            "paced ceiling p99 ms": ms(percentile(paced, 0.99)),
            "paced ceiling CPU ms/start": round(sum(paced_cpu_ms.values()), 1),
            "held req/s": round(held_rate, 1),
            "held p99 ms": ms(percentile(held, 0.99)),
            "held CPU ms/req": round(sum(held_cpu_ms.values()), 1),
        },
        notes=[
            "each case created starts its workflow, records request and insurance check while the next POSTs "
            "arrive; the ceiling's workflows have no worker",
            f"CPU ms per request by process: {CpuUse.describe(cpu_ms)}",
            f"ceiling CPU ms per start: {CpuUse.describe(raw_cpu_ms)}",
            f"paced ceiling (the bare workflow doing a case's first steps as the run did, {steps}, each signal "
            f"sent once the step before it ran, while the next starts arrive): ratio {api_rate / paced_rate:.2f}, "
            f"p50 ms {ms(percentile(paced, 0.5))}, CPU ms per start {CpuUse.describe(paced_cpu_ms)}",
            f"first steps held (the worker stopped for {seconds / 2:.0f} s, the same POSTs: what the API adds to "
            f"a start): ratio {held_rate / raw_rate:.2f}, p50 ms {ms(percentile(held, 0.5))}, p99 ms "
            f"{ms(percentile(held, 0.99))}, CPU ms per request {CpuUse.describe(held_cpu_ms)}; "
            f"{os.cpu_count()} cores sustain at most {sustained(held_cpu_ms)} such requests/s",
            "Temporal's own counters per request (a case | a bare start | a paced bare start): "
            + ServerWork.side_by_side(
                work.per_unit(len(api)), raw_work.per_unit(len(raw)), paced_work.per_unit(len(paced))
            ),
            "at the CPU each used per unit, its first steps included, "
            f"{os.cpu_count()} cores sustain at most {sustained(cpu_ms)} cases/s, the paced ceiling "
            f"{sustained(paced_cpu_ms)}, bare starts {sustained(raw_cpu_ms)}; the starts outrun their first "
            "steps while the steps wait in Temporal's task queue",
            # Little's law: with `concurrency` callers always waiting, the mean latency is concurrency/rate,
            # and p99 is at least the mean.
            f"p99 < {P99_LIMIT_MS:.0f} ms with {concurrency} callers always waiting needs more than "
            f"{concurrency / (P99_LIMIT_MS / 1000):.0f} req/s (Little's law); the ceiling itself reached "
            f"{raw_rate:.0f} starts/s",
        ],
    )


def sustained(cpu_ms: dict[str, float]) -> str:
    """Units per second this machine's cores could keep up, at `cpu_ms` of CPU per unit."""
    return f"{(os.cpu_count() or 1) * 1000 / max(sum(cpu_ms.values()), 0.1):.0f}"


def run(system: System, *, smoke: bool) -> Result:
    return asyncio.run(measure(system, concurrency=4 if smoke else 32, seconds=2 if smoke else 30))
