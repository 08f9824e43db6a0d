"""An exception recorded on a span is exported by its type only: its message and stack trace may quote the
values that caused it (a pydantic `input_value`, SQL parameters), which are PHI."""

from __future__ import annotations

import pydantic
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from services.common.tracing import WithoutExceptionText


class Patient(pydantic.BaseModel):
    birth_date: pydantic.PastDate


def test_an_exception_event_keeps_its_type_and_drops_its_message_and_stack() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(WithoutExceptionText(SimpleSpanProcessor(exporter)))
    tracer = provider.get_tracer("test")

    with pytest.raises(ValueError), tracer.start_as_current_span("review process review.match") as span:
        span.add_event("message.received", {"messaging.message.id": "m-1"})
        try:
            Patient.model_validate({"birth_date": "1984-02-31"})
        except pydantic.ValidationError as exc:
            raise ValueError("review.match has an invalid body") from exc
    with tracer.start_as_current_span("RunActivity:publish") as span:  # as Temporal's interceptor does
        span.set_status(Status(StatusCode.ERROR, "ValidationError: input_value='1984-02-31'"))

    raised, failed = exporter.get_finished_spans()
    [received, exception] = raised.events
    assert dict(received.attributes or {}) == {"messaging.message.id": "m-1"}  # other events as they were
    assert exception.name == "exception"
    assert dict(exception.attributes or {}) == {"exception.type": "ValueError", "exception.escaped": "False"}
    assert raised.status.status_code == StatusCode.ERROR and not raised.status.description
    assert failed.status.status_code == StatusCode.ERROR and not failed.status.description
    assert "1984-02-31" not in repr(
        [(s.events, s.status.description, s.attributes) for s in (raised, failed)]
    )
