"""One trace follows a case: HTTP request -> workflow -> activity -> AMQP command -> service handler ->
outbox event. Real Temporal, real broker, real database; spans collected in memory."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pika
from fastapi import APIRouter
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlmodel import Session
from temporalio.client import Client

from contracts import CloudEvent, new_event
from contracts.events import RecordsIncomplete
from services.common import migrate
from services.common.amqp import EVENTS, Consumer, OutboxRelay, enqueue, ensure_topology
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.common.tracing import WithoutExceptionText, temporal_interceptors
from tests.infra import purge_queues
from tests.integration.test_case_workflow import case_input
from workflows.case import CaseWorkflow
from workflows.worker import build_worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def span_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    # As deployed (`exporting`), but each span at once: without exception texts.
    provider.add_span_processor(WithoutExceptionText(SimpleSpanProcessor(exporter)))
    return exporter


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


async def test_a_case_is_one_trace_from_http_to_the_services_handler(
    temporal_env, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    exporter = span_exporter()
    ensure_topology(settings)
    purge_queues(settings.amqp_url, "records")
    engine = make_engine("intake", settings)  # any service schema has the inbox and outbox
    migrate.upgrade("intake", engine)
    traced = Client(
        temporal_env.client.service_client,
        namespace=temporal_env.client.namespace,
        data_converter=temporal_env.client.data_converter,
        interceptors=temporal_interceptors(),
    )
    queue = f"traced-{uuid.uuid4().hex[:6]}"
    case_id = str(uuid.uuid4())

    router = APIRouter()

    @router.post("/start")
    async def start() -> dict[str, str]:
        await traced.start_workflow(
            CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=queue
        )
        return {"case_id": case_id}

    handled: list[str] = []

    def records_handler(session: Session, event: CloudEvent) -> None:
        handled.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        enqueue(
            session,
            EVENTS,
            new_event(
                id=f"{event.id}>incomplete", source="/test", subject=event.subject,
                data=RecordsIncomplete(case_id=event.subject, missing=["report"]),
            ),
        )  # fmt: skip

    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    events = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(events, EVENTS, routing_key="records.incomplete")
    relay = OutboxRelay(settings=settings, engine=engine, interval=0.1)
    consumer = Consumer(
        settings=settings, queue="records", engine=engine, handle=records_handler, on_commit=relay.wake
    )
    threads = [threading.Thread(target=part.run_forever, daemon=True) for part in (relay, consumer)]
    for thread in threads:
        thread.start()
    app = create_app("tracing-test", routers=[router], engine=lambda: engine)
    try:
        with ThreadPoolExecutor(4) as executor:
            async with build_worker(
                traced, settings.model_copy(update={"temporal_task_queue": queue}), executor
            ):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                    response = await http.post(
                        "/start", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
                    )
                assert response.status_code == 200
                for _ in range(200):
                    method, props, body = channel.basic_get(events, auto_ack=True)
                    if method is not None:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the handler's event never arrived")
                await traced.get_workflow_handle(f"case-{case_id}").terminate("test done")
    finally:
        consumer.stop()
        relay.stop()
        for thread in threads:
            thread.join(5)
        conn.close()

    assert handled and handled[0] == TRACE_ID  # the service's handler ran in the request's trace
    assert trace_id_of(props.headers["traceparent"]) == TRACE_ID  # ... and its outbox event carries it on
    assert trace_id_of(json.loads(body)["traceparent"]) == TRACE_ID
    names = {
        span.name
        for span in exporter.get_finished_spans()
        if format(span.context.trace_id, "032x") == TRACE_ID
    }
    assert "POST /start" in names
    assert any(name.startswith("StartWorkflow:CaseWorkflow") for name in names)
    # The first step's status change and its commands (records, insurance) go out in one local activity.
    assert any(name.startswith("RunActivity:publish_batch") for name in names)
    assert "records process records.collect" in names


def test_a_request_is_one_server_span_named_by_its_route_with_no_request_content() -> None:
    """Our middleware's span only: FastAPI's own telemetry (a second SERVER span, spans for dependencies
    and serialization, exception messages as span events) stays off."""
    exporter = span_exporter()
    router = APIRouter()

    @router.post("/v1/things/{thing_id}")
    def thing(thing_id: str, body: dict[str, str]) -> dict[str, str]:
        return {"id": thing_id}

    client = TestClient(create_app("tracetest", routers=[router], engine=lambda: None))  # type: ignore[arg-type,return-value]
    exporter.clear()
    assert client.post("/v1/things/42", json={"family_name": "Doe"}).status_code == 200
    assert client.post("/v1/things/42", json=["not", "an", "object"]).status_code == 422

    spans = exporter.get_finished_spans()
    assert [(s.kind, s.name) for s in spans] == [(SpanKind.SERVER, "POST /v1/things/{thing_id}")] * 2
    assert [s.attributes["http.response.status_code"] for s in spans] == [200, 422]  # type: ignore[index]
    assert all(s.attributes["http.route"] == "/v1/things/{thing_id}" for s in spans)  # type: ignore[index]
    assert not any(s.events for s in spans)
    assert "Doe" not in repr([dict(s.attributes or {}) for s in spans])
