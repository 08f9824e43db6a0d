"""The worker process: the case workflow and its activities on task queue `cases`, plus the event bridge."""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from temporalio.client import Client
from temporalio.worker import PollerBehaviorAutoscaling, UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from services.common.amqp import ensure_topology
from services.common.config import Settings, get_settings
from services.common.logging import configure_logging
from services.common.temporal import connect_temporal, metrics_runtime
from services.common.tracing import configure_tracing
from workflows.activities import CaseActivities
from workflows.bridge import EventBridge
from workflows.case import CaseWorkflow

log = structlog.get_logger(__name__)


def precompile_workflows() -> None:
    """Write the bytecode of the workflow modules even under PYTHONDONTWRITEBYTECODE.

    With WORKFLOW_SANDBOX on, the sandbox imports the workflow's module afresh for every workflow it
    builds; without a .pyc that is a compile of the module's source each time, which profiled as a third of
    the worker's CPU. The image compiles everything at build time; a read-only tree without it only costs
    speed.
    """
    with contextlib.suppress(OSError):
        compileall.compile_dir(Path(__file__).parent, quiet=2)


def workflow_runner(settings: Settings) -> WorkflowRunner:
    """The SDK's sandbox when WORKFLOW_SANDBOX is on (the test suite), else the plain runner."""
    return SandboxedWorkflowRunner() if settings.workflow_sandbox else UnsandboxedWorkflowRunner()


def build_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor) -> Worker:
    if settings.workflow_sandbox:
        precompile_workflows()
    activities = CaseActivities(settings)
    return Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[CaseWorkflow],
        workflow_runner=workflow_runner(settings),
        activities=[activities.publish_command, activities.publish_event, activities.publish_batch],
        activity_executor=executor,
        max_concurrent_activities=executor._max_workers,
        # With thousands of cases open the backlog of workflow tasks is long; five pollers, four of them on
        # this worker's sticky queue, fetched ~3 tasks/s from the shared queue (make bench scale). Let
        # the server's hints scale the pollers, and give the shared queue as many as the sticky one.
        workflow_task_poller_behavior=PollerBehaviorAutoscaling(minimum=2, maximum=40, initial=10),
        nonsticky_to_sticky_poll_ratio=1.0,
        activity_task_poller_behavior=PollerBehaviorAutoscaling(minimum=1, maximum=20, initial=5),
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    ensure_topology(settings)
    address = settings.worker_metrics_address
    client = await connect_temporal(settings, runtime=metrics_runtime(address) if address else None)
    if address:
        log.info("worker.metrics", address=address)
    bridge = EventBridge(settings=settings, client=client, loop=asyncio.get_running_loop())
    bridge_thread = threading.Thread(target=bridge.run_forever, name="event-bridge", daemon=True)
    with ThreadPoolExecutor(max_workers=16) as executor:
        worker = build_worker(client, settings, executor)
        bridge_thread.start()
        log.info("worker.started", task_queue=settings.temporal_task_queue, sandbox=settings.workflow_sandbox)
        async with worker:
            await stop.wait()
        bridge.stop()
        bridge_thread.join(timeout=5)


def main() -> None:
    settings = get_settings()
    configure_logging("worker", settings.log_level)
    settings.require_safe_for_production()
    configure_tracing("worker", settings)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(_main())
    sys.stdout.flush()
    # temporalio can abort the interpreter at exit (sdk-python #300); exit with our own status.
    os._exit(0)


if __name__ == "__main__":
    main()
