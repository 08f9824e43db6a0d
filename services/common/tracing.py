"""OpenTelemetry tracing: one trace follows a case from the HTTP request through the workflow and the
RabbitMQ messages to each service's handler.

- HTTP: a SERVER span per request, continuing an incoming W3C `traceparent`.
- Temporal: `TracingInterceptor` on every client (and so on the worker) carries the context into the
  workflow, its activities and signals.
- AMQP: the W3C `traceparent` travels in the AMQP headers and, as the CloudEvents distributed-tracing
  extension, in the envelope itself (so it survives the outbox); each consumer continues it in a CONSUMER span.

Spans are exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise they only propagate.
An exception recorded on a span (by our spans, Temporal's interceptor or a library) is exported by its type
only: its message and stack trace may quote values (a pydantic `input_value`, SQL parameters), which are PHI.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status

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
        provider.add_span_processor(exporting(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


# What an exception event keeps (OpenTelemetry semantic conventions): its type, never its message or stack.
KEPT_EXCEPTION_ATTRIBUTES = ("exception.type", "exception.escaped")


def exporting(exporter: SpanExporter) -> SpanProcessor:
    """The processor that sends finished spans to `exporter`, in batches, without exception texts."""
    return WithoutExceptionText(BatchSpanProcessor(exporter))


def without_exception_text(span: ReadableSpan) -> ReadableSpan:
    """`span` with each exception event reduced to its type and the status without its description (Temporal's
    interceptor writes "Type: message" there)."""
    if not any(event.name == "exception" for event in span.events) and not span.status.description:
        return span
    events = [
        Event(
            event.name,
            {k: v for k, v in (event.attributes or {}).items() if k in KEPT_EXCEPTION_ATTRIBUTES},
            event.timestamp,
        )
        if event.name == "exception"
        else event
        for event in span.events
    ]
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=Status(span.status.status_code),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class WithoutExceptionText(SpanProcessor):
    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self.inner.on_end(without_exception_text(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


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
