"""`pipeline`: N cases end to end (small synthetic study, automated specialist through the review API, cost
decision and close via Temporal updates) vs a bare workflow of the same shape on the same server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from temporalio.client import Client

from bench import bare
from bench.cases import demo_files, run_case, widen_directory
from bench.db_work import DbWork, describe
from bench.result import Result
from bench.server_work import ServerWork
from bench.stats import ms, percentile
from bench.status_feed import subscribed
from bench.system import CpuUse, System
from services.common.temporal import connect_temporal
from workflows.worker import workflow_runner

TARGET = 0.5


@dataclass
class Ceilings:
    """The bare workflow of the case's shape, run as fast as the server takes it and paced as the case was."""

    seconds: list[float]
    elapsed: float
    cpu: CpuUse
    work: ServerWork
    paced_elapsed: float
    paced_cpu: CpuUse
    paced_work: ServerWork


async def run_ceilings(system: System, shape: bare.Shape, cases: int, concurrency: int) -> Ceilings:
    settings = system.settings
    plain = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    async with bare.bare_worker(plain, workflow_runner(settings)):
        await bare.run_bare_concurrently(plain, shape, 1, 1)  # warm-up
        work = await ServerWork(system).begin()
        started = time.monotonic()
        with CpuUse(system) as cpu:
            seconds = await bare.run_bare_concurrently(plain, shape, cases, concurrency)
        elapsed = time.monotonic() - started
        await work.end()
        await bare.run_bare_concurrently(plain, shape, 1, 1, paced=True)  # warm-up
        paced_work = await ServerWork(system).begin()
        started = time.monotonic()
        with CpuUse(system) as paced_cpu:
            await bare.run_bare_concurrently(plain, shape, cases, concurrency, paced=True)
        paced_elapsed = time.monotonic() - started
        await paced_work.end()
    return Ceilings(seconds, elapsed, cpu, work, paced_elapsed, paced_cpu, paced_work)


async def measure(system: System, cases: int, concurrency: int, *, ceilings_first: bool = False) -> Result:
    settings = system.settings
    temporal = await connect_temporal(settings)
    files = demo_files()
    gate = asyncio.Semaphore(concurrency)
    seconds: list[float] = []
    failures: list[str] = []
    async with (
        httpx.AsyncClient(timeout=120, headers=system.headers) as http,
        subscribed(http, system) as feed,
    ):
        await widen_directory(http, system, max_open_reviews=100)

        async def one() -> None:
            async with gate:
                try:
                    seconds.append(await run_case(http, temporal, system, files, feed))
                except Exception as exc:  # counted and reported; the other cases go on
                    failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

        await run_case(
            http, temporal, system, files, feed
        )  # warm-up; also the case whose shape the ceiling copies
        first = (await http.get(f"{settings.intake_url}/v1/cases", params={"status": "closed"})).json()
        shape = await bare.shape_of(temporal, f"case-{first['items'][0]['case_id']}")
        rows = DbWork(system)
        if ceilings_first:
            # The smoke run's ceilings run while PostgreSQL's statistics settle after the warm-up case (DbWork
            # waits ten seconds and more for idle backends to report): the bare workflows write no row of the
            # services. The full run keeps its order, ceilings after the cases, on a server that then holds
            # their histories too: measured first on an emptier server, the ceiling came out twice as fast.
            ceilings, _ = await asyncio.gather(run_ceilings(system, shape, cases, concurrency), rows.begin())
        else:
            await rows.begin()
        work = await ServerWork(system).begin()
        started = time.monotonic()
        with CpuUse(system) as cpu:
            await asyncio.gather(*(one() for _ in range(cases)))
        elapsed = time.monotonic() - started
        await asyncio.gather(work.end(), rows.end())
    if not ceilings_first:
        ceilings = await run_ceilings(system, shape, cases, concurrency)

    bare_seconds, bare_cpu, bare_work = ceilings.seconds, ceilings.cpu, ceilings.work
    paced_cpu, paced_work = ceilings.paced_cpu, ceilings.paced_work
    bare_elapsed, paced_elapsed = ceilings.elapsed, ceilings.paced_elapsed
    rate, ceiling, paced = len(seconds) / elapsed, cases / bare_elapsed, cases / paced_elapsed
    cpu_ms, bare_cpu_ms, paced_cpu_ms = (
        cpu.per_unit(cases),
        bare_cpu.per_unit(cases),
        paced_cpu.per_unit(cases),
    )
    ratio = rate / ceiling
    return Result(
        name="pipeline",
        what=f"{cases} cases end to end, {concurrency} at a time",
        ceiling=(
            f"bare workflow: {shape.activities} activities, {shape.local_activities} local activities, "
            f"{shape.signals} signals, {shape.updates} updates"
        ),
        ratio=ratio,
        target=f">={TARGET}",
        ok=ratio >= TARGET and not failures,
        figures={
            "cases closed": len(seconds),
            "cases/s": round(rate, 2),
            "p50 ms": ms(percentile(seconds, 0.5)),
            "p95 ms": ms(percentile(seconds, 0.95)),
            "ceiling cases/s": round(ceiling, 2),
            "ceiling p50 ms": ms(percentile(bare_seconds, 0.5)),
            "ceiling p95 ms": ms(percentile(bare_seconds, 0.95)),
            "CPU ms/case": round(sum(cpu_ms.values())),
            "ceiling CPU ms/case": round(sum(bare_cpu_ms.values())),
            "paced ceiling cases/s": round(paced, 2),
            "paced ceiling CPU ms/case": round(sum(paced_cpu_ms.values())),
        },
        notes=[
            "case times exclude the patient's, specialist's and referrer's turns",
            "every specialist may hold 100 open reviews (seeded: 5)",
            f"CPU ms per case by process: {CpuUse.describe(cpu_ms)}",
            f"ceiling CPU ms per case (its worker runs in bench): {CpuUse.describe(bare_cpu_ms)}",
            f"paced ceiling (each signal or update sent once the activities after the previous one ran, as "
            f"in the case; steps {shape.describe_steps()}): ratio {rate / paced:.2f}, CPU ms per case "
            f"{CpuUse.describe(paced_cpu_ms)}",
            "Temporal's own counters per case (the case | ceiling | paced ceiling): "
            + ServerWork.side_by_side(
                work.per_unit(cases), bare_work.per_unit(cases), paced_work.per_unit(cases)
            ),
            "PostgreSQL rows per case (inserted/updated/deleted), by service schema and busiest table: "
            + describe(rows.per_unit(cases)),
            *failures[:5],
        ],
    )


def run(system: System, *, smoke: bool) -> Result:
    return asyncio.run(
        measure(system, cases=2 if smoke else 200, concurrency=2 if smoke else 16, ceilings_first=smoke)
    )
