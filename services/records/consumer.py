"""AMQP entry point: turns a `records.*` command into a handler call."""

from __future__ import annotations

from pydantic import ValidationError
from sqlmodel import Session

from contracts.commands import CollectRecords
from contracts.envelope import CloudEvent
from services.common.config import Settings, get_settings
from services.common.errors import PoisonMessage
from services.records import handlers


def handle(session: Session, event: CloudEvent, settings: Settings | None = None) -> None:
    if event.type != CollectRecords.TYPE:
        raise PoisonMessage(f"records does not handle {event.type!r}; it handles {CollectRecords.TYPE!r}")
    try:
        command = CollectRecords.model_validate(event.data)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors()[:5])
        raise PoisonMessage(f"{event.type} data is invalid ({exc.error_count()} error(s): {fields})") from exc
    if command.case_id != event.subject:
        raise PoisonMessage(f"{event.type} subject {event.subject!r} is not its data's case_id")
    handlers.collect(command, session, settings or get_settings())
