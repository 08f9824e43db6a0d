"""AMQP entrypoint: turns a command on queue `review` into a call to its handler."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from contracts.commands import ComposeReport, MatchSpecialist
from contracts.envelope import CloudEvent
from services.common.config import Settings, get_settings
from services.common.errors import PoisonMessage
from services.review import handlers

COMMANDS: dict[str, type[BaseModel]] = {
    MatchSpecialist.TYPE: MatchSpecialist,
    ComposeReport.TYPE: ComposeReport,
}


def handle(session: Session, event: CloudEvent, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    command = parse(event)
    if isinstance(command, MatchSpecialist):
        handlers.match(command, session, settings, event_id=event.id)
    elif isinstance(command, ComposeReport):
        handlers.compose(command, session, settings)


def parse(event: CloudEvent) -> BaseModel:
    model = COMMANDS.get(event.type)
    if model is None:
        raise PoisonMessage(
            f"the review service does not handle {event.type!r}; it handles {sorted(COMMANDS)}"
        )
    try:
        command = model.model_validate(event.data)
    except ValidationError as exc:
        # Field names only: the values may be a patient's name or birth date.
        fields = ", ".join(".".join(map(str, e["loc"])) or "data" for e in exc.errors()[:10])
        raise PoisonMessage(f"{event.type} data does not match its schema (bad fields: {fields})") from exc
    if getattr(command, "case_id", None) != event.subject:
        raise PoisonMessage(f"{event.type} is about case {event.subject} but its data names another case")
    return command
