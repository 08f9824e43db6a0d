"""The worker's Temporal SDK metrics for Prometheus (WORKER_METRICS_ADDRESS): operations alert on a case whose
workflow task fails, which otherwise retries for ever with nothing to show but the Temporal UI's history."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
from temporalio.client import Client

from services.common.config import Settings
from tests.infra import free_port
from workflows import worker

FAILED = re.compile(
    r"^temporal_workflow_task_execution_failed_total\{(?P<labels>[^}]*)\} (?P<n>[0-9.e+]+)$", re.M
)


async def scraped(address: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(f"http://{address}/metrics")
    assert answer.status_code == 200
    return answer.text


async def failures(address: str, queue: str) -> float:
    return sum(
        float(m["n"])
        for m in FAILED.finditer(await scraped(address))
        if f'task_queue="{queue}"' in m["labels"]
    )


async def test_the_workers_metrics_count_a_case_whose_workflow_task_fails(
    temporal_env, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    client: Client = temporal_env.client
    address = f"127.0.0.1:{free_port()}"
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    mine = settings.model_copy(
        update={
            "worker_metrics_address": address,
            "temporal_task_queue": queue,
            "temporal_address": client.service_client.config.target_host,
        }
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(mine, stop))
    try:
        for _ in range(100):  # the endpoint is up once the worker's client is
            try:
                text = await scraped(address)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"no metrics at {address}")
        assert await failures(address, queue) == 0

        # A case input this worker cannot read (a field of a later release): its workflow task fails, and again.
        handle = await client.start_workflow(
            "CaseWorkflow", {"a_field_of_a_later_release": 1}, id=f"case-{uuid.uuid4()}", task_queue=queue
        )
        for _ in range(200):
            if await failures(address, queue) >= 1:
                break
            await asyncio.sleep(0.1)
        text = await scraped(address)
        assert await failures(address, queue) >= 1, text
        assert "temporal_workflow_task_schedule_to_start_latency" in text  # and the rest of the SDK's own
        await handle.terminate("test: a case no worker of this release can run")
    finally:
        stop.set()
        await running
