"""The intake process: case, FHIR, partner and webhook APIs, its consumer, the outbox relay, the
workflow-start reconciler, the outbound webhook sender, the HL7 v2 (MLLP) sender and, when INTAKE_MLLP_PORT is set,
the MLLP listener taking HL7 v2 orders."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from temporalio.client import Client

from services.auth import api as partners_api
from services.auth import smart_api
from services.common import migrate
from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.common.temporal import connect_temporal
from services.intake import (
    api,
    consumer,
    fhir_api,
    fhir_subscriptions,
    handlers,
    hl7_in,
    hl7_out,
    hl7_out_api,
    hl7_senders_api,
    idempotency,
    webhooks_in,
    webhooks_out,
    webhooks_out_api,
)
from services.intake.fhir_service_request import fhir_base
from services.intake.models import Hl7Message, WebhookDelivery

log = structlog.get_logger(__name__)

settings = get_settings()
runtime = ServiceRuntime(
    service="intake", engine=lambda: get_engine("intake"), handle=consumer.handle, uses_temporal=True
)

RECONCILE_EVERY_SECONDS = 5.0
PURGE_EVERY_SECONDS = 3600.0


async def reconcile_workflow_starts(app: FastAPI) -> None:
    """Start the workflow of every stored case that has none yet (Temporal was down at creation), signal
    consent documents the workflow has not been told about, queue FHIR Subscriptions' heartbeats, and hourly
    forget week-old idempotency keys (HL7 order ACKs among them) and the bytes of HL7 messages delivered more than
    30 days ago."""
    purged_at = float("-inf")
    while True:
        await asyncio.sleep(RECONCILE_EVERY_SECONDS)
        try:
            if time.monotonic() - purged_at > PURGE_EVERY_SECONDS:
                await asyncio.to_thread(idempotency.purge, get_engine("intake"))
                await asyncio.to_thread(hl7_out.forget_sent, get_engine("intake"))
                purged_at = time.monotonic()
            await asyncio.to_thread(
                fhir_subscriptions.queue_heartbeats, get_engine("intake"), fhir_base(settings)
            )
            cases = await asyncio.to_thread(api.unstarted_cases, get_engine("intake"))
            consents = await asyncio.to_thread(api.unsignalled_consents, get_engine("intake"))
            if not cases and not consents:
                continue
            client = getattr(app.state, "temporal", None) or await connect_temporal(settings)
            app.state.temporal = client
            for case in cases:
                await handlers.start_workflow(client, case, settings)
                await asyncio.to_thread(api.mark_started, get_engine("intake"), [case.id])
                log.info("workflow.started_by_reconciler", case_id=case.id)
            for document in consents:
                await api.signal_consent(get_engine("intake"), client, document)
        except Exception as exc:
            log.warning("reconciler.failed", error=type(exc).__name__)


async def start_order_listener(app: FastAPI) -> hl7_in.OrderListener | None:
    """The MLLP listener for HL7 v2 orders, when INTAKE_MLLP_PORT is set."""
    if settings.intake_mllp_port is None:
        return None

    async def temporal() -> Client | None:
        client = getattr(app.state, "temporal", None)
        if client is None:
            try:
                client = app.state.temporal = await connect_temporal(settings)
            except Exception as exc:
                log.warning("temporal.unreachable", error=type(exc).__name__)
        return client

    listener = hl7_in.OrderListener(
        get_engine("intake"),
        get_engine("auth"),
        settings,
        temporal,
        host=settings.host,
        port=settings.intake_mllp_port,
        tls=hl7_in.server_tls(settings),
    )
    await listener.start()
    return listener


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.to_thread(migrate.upgrade, "auth", get_engine("auth"))
    async with runtime.lifespan()(app):
        task = asyncio.create_task(reconcile_workflow_starts(app))
        dispatcher = webhooks_out.WebhookDispatcher(
            engine=get_engine("intake"), auth_engine=get_engine("auth"), env=settings.env
        )
        # A status change reaches the partner now, not within a second.
        runtime.on_commit(dispatcher.wake, wrote=WebhookDelivery)
        sender = threading.Thread(target=dispatcher.run_forever, name="intake-webhooks", daemon=True)
        sender.start()
        key = settings.intake_report_key
        hl7_sender = hl7_out.Hl7Sender(
            engine=get_engine("intake"), env=settings.env, report_key=key.get_secret_value() if key else None
        )
        runtime.on_commit(hl7_sender.wake, wrote=Hl7Message)
        mllp = threading.Thread(target=hl7_sender.run_forever, name="intake-hl7", daemon=True)
        mllp.start()
        orders = await start_order_listener(app)
        try:
            yield
        finally:
            if orders is not None:
                await orders.stop()
            dispatcher.stop()
            hl7_sender.stop()
            sender.join(timeout=15)
            mllp.join(timeout=15)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


app = create_app(
    "intake",
    routers=[
        api.router,
        fhir_api.router,
        webhooks_in.router,
        partners_api.router,
        webhooks_out_api.router,
        hl7_out_api.router,
        hl7_senders_api.router,
        smart_api.token_router,
        smart_api.clients_router,
    ],
    engine=lambda: get_engine("intake"),
    ready_checks=[runtime.broker_ready],
    lifespan=lifespan,
    title="secondopinion intake",
)


def main() -> None:
    serve(app, settings.intake_port)


if __name__ == "__main__":
    main()
