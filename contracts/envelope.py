"""CloudEvents 1.0, JSON structured mode. `id` is deterministic for retried work and is the AMQP message_id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    specversion: str = Field(default="1.0", pattern=r"^1\.0$")
    id: str = Field(min_length=1, max_length=300)
    source: str = Field(min_length=1)
    # At most the inbox's message_type and the outbox's routing_key hold.
    type: str = Field(min_length=1, max_length=100, pattern=r"^[a-z_]+(\.[a-z_]+)+$")
    subject: str = Field(min_length=1, description="the case id")
    time: datetime
    datacontenttype: str = "application/json"
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def new_event(*, id: str, source: str, data: BaseModel, subject: str, type: str | None = None) -> CloudEvent:
    """Wrap a command or event model in an envelope; its `type` comes from the model's `TYPE`."""
    event_type = type or getattr(data, "TYPE", None)
    if not event_type:
        raise ValueError(f"{data.__class__.__name__} has no TYPE; pass type=")
    return CloudEvent(
        id=id,
        source=source,
        type=event_type,
        subject=subject,
        time=datetime.now(UTC),
        data=data.model_dump(mode="json"),
    )
