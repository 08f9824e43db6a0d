"""OpenTelemetry tracing: one trace follows a case from the HTTP request through the workflow and the
RabbitMQ messages to each service's handler.

- HTTP: a SERVER span per request, continuing an incoming W3C `traceparent`.
- Temporal: `TracingInterceptor` on every client (and so on the worker) carries the context into the
  workflow, its activities and signals.
- AMQP: the W3C `traceparent` travels in the AMQP headers and, as the CloudEvents distributed-tracing
  extension, in the envelope itself (so it survives the outbox); each consumer continues it in a CONSUMER span.

Spans are exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise they only propagate.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind

from services.common.config import Settings

tracer = trace.get_tracer("secondopinion")

TRACE_HEADERS = ("traceparent", "tracestate")


def configure_tracing(service: str, settings: Settings) -> None:
    """Install the SDK tracer provider once per process (a test may have installed one already)."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"secondopinion-{service}"}))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


def current_trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, empty when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def trace_headers_of(body: bytes) -> dict[str, str]:
    """The tracing extension attributes of a CloudEvents JSON envelope."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return {}
    return {k: str(envelope[k]) for k in TRACE_HEADERS if isinstance(envelope, dict) and envelope.get(k)}


@contextlib.contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name, context=propagate.extract(dict(headers)), kind=SpanKind.SERVER
    ) as span:
        yield span


@contextlib.contextmanager
def consumer_span(name: str, *carriers: Mapping[str, Any] | None) -> Iterator[Span]:
    """A CONSUMER span continuing the first carrier (AMQP headers, then the envelope) that has a traceparent."""
    carrier: dict[str, str] = {}
    for candidate in carriers:
        if candidate and candidate.get("traceparent"):
            carrier = {k: str(candidate[k]) for k in TRACE_HEADERS if candidate.get(k)}
            break
    with tracer.start_as_current_span(
        name, context=propagate.extract(carrier), kind=SpanKind.CONSUMER
    ) as span:
        yield span


def temporal_interceptors() -> list[Any]:
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]
