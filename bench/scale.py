"""`scale`: many open cases waiting for records: the worker's RSS, `temporal workflow count` by CaseStatus,
and GET /v1/cases?status=… p99 with a partner key. No ceiling: absolute limits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import httpx

from bench.cases import case_request
from bench.result import Result
from bench.stats import ms, percentile
from bench.system import System, rss_bytes
from contracts.models import CaseStatus
from scripts import stack

RSS_LIMIT, P99_LIMIT_MS = 1024**3, 300.0
WAITING = "awaiting_records"


async def open_cases(system: System, count: int, concurrency: int) -> None:
    url = f"{system.settings.intake_url}/v1/cases"
    left = iter(range(count))
    async with httpx.AsyncClient(timeout=120, headers=system.headers) as http:

        async def caller() -> None:
            for _ in left:
                response = await http.post(url, json=case_request(system))
                if response.status_code != 201:
                    raise RuntimeError(f"intake answered {response.status_code}: {response.text[:300]}")

        await asyncio.gather(*(caller() for _ in range(concurrency)))


def temporal(system: System, *args: str) -> Any:
    command = [stack.temporal_cli(), *args, "--address", system.settings.temporal_address, "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"temporal {' '.join(args)} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def count_by_status(system: System) -> dict[str, int]:
    """`temporal workflow count` of running cases per CaseStatus (the dev server's visibility store refuses
    `GROUP BY` on custom search attributes, so one count per status)."""
    counts = {}
    for status in CaseStatus:
        query = f'ExecutionStatus="Running" AND CaseStatus="{status.value}"'
        found = int(temporal(system, "workflow", "count", "--query", query).get("count", 0))
        if found:
            counts[status.value] = found
    return counts


def wait_for_waiting(system: System, count: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = count_by_status(system)
        if counts.get(WAITING, 0) >= count or time.monotonic() > deadline:
            return counts
        time.sleep(1)


async def list_latencies(system: System, requests: int) -> list[float]:
    url = f"{system.settings.intake_url}/v1/cases"
    latencies = []
    async with httpx.AsyncClient(timeout=60, headers=system.headers) as http:
        for _ in range(requests):
            started = time.monotonic()
            response = await http.get(url, params={"status": WAITING, "limit": 50})
            latencies.append(time.monotonic() - started)
            response.raise_for_status()
            if not response.json()["items"]:
                raise RuntimeError("the partner sees no waiting cases; the list would measure nothing")
    return latencies


def measure(system: System, cases: int, requests: int, settle: float) -> Result:
    # Cases the other benchmarks left waiting count too; ours are the ones beyond them.
    before = count_by_status(system).get(WAITING, 0)
    started = time.monotonic()
    asyncio.run(open_cases(system, cases, concurrency=32))
    opened = time.monotonic() - started
    counts = wait_for_waiting(system, before + cases, timeout=settle)
    worker_rss = rss_bytes(system.pid("worker"))
    latencies = asyncio.run(list_latencies(system, requests))
    p99 = ms(percentile(latencies, 0.99))
    waiting = counts.get(WAITING, 0) - before
    return Result(
        name="scale",
        what=f"{cases} open cases waiting for records",
        ceiling="-",
        ratio=None,
        target="worker RSS<1GB, p99<300ms",
        ok=worker_rss < RSS_LIMIT and p99 < P99_LIMIT_MS and waiting >= cases,
        figures={
            "cases waiting": waiting,
            "waiting before": before,
            "worker RSS MB": round(worker_rss / 1e6),
            "list p50 ms": ms(percentile(latencies, 0.5)),
            "list p99 ms": p99,
            "opened cases/s": round(cases / opened, 1),
        },
        notes=[
            f"temporal workflow count by CaseStatus: {json.dumps(counts, sort_keys=True)}",
            f"measured once all were waiting, or {settle:.0f} s after the last case was opened at the latest",
        ],
    )


def run(system: System, *, smoke: bool) -> Result:
    if smoke:
        return measure(system, cases=20, requests=20, settle=60)
    # The last cases wait behind the others' records requests and insurance checks: give them time.
    return measure(system, cases=10_000, requests=300, settle=600)
