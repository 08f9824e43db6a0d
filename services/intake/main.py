"""The intake process: case API, its consumer, the outbox relay and the workflow-start reconciler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.common.temporal import connect_temporal
from services.intake import api, consumer, handlers

log = structlog.get_logger(__name__)

settings = get_settings()
runtime = ServiceRuntime(service="intake", engine=lambda: get_engine("intake"), handle=consumer.handle)

RECONCILE_EVERY_SECONDS = 5.0


async def reconcile_workflow_starts(app: FastAPI) -> None:
    """Start the workflow of every stored case that has none yet (Temporal was down at creation)."""
    while True:
        await asyncio.sleep(RECONCILE_EVERY_SECONDS)
        try:
            cases = await asyncio.to_thread(api.unstarted_cases, get_engine("intake"))
            if not cases:
                continue
            client = getattr(app.state, "temporal", None) or await connect_temporal(settings)
            app.state.temporal = client
            for case in cases:
                await handlers.start_workflow(client, case, settings)
                await asyncio.to_thread(api.mark_started, get_engine("intake"), case.id)
                log.info("workflow.started_by_reconciler", case_id=case.id)
        except Exception as exc:
            log.warning("reconciler.failed", error=type(exc).__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with runtime.lifespan()(app):
        task = asyncio.create_task(reconcile_workflow_starts(app))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


app = create_app(
    "intake",
    routers=[api.router],
    engine=lambda: get_engine("intake"),
    ready_checks=[runtime.broker_ready],
    lifespan=lifespan,
    title="secondopinion intake",
)


def main() -> None:
    serve(app, settings.intake_port)


if __name__ == "__main__":
    main()
