"""AMQP entry point: turns a `records.*` command or a `case.cancelled` event into a handler call."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from contracts.commands import CollectRecords, ReconcileIdentity, RemindRecords
from contracts.envelope import CloudEvent
from contracts.events import CaseCancelled, EncapsulatedReport
from services.common.config import Settings, get_settings
from services.common.errors import PoisonMessage
from services.records import handlers, second_opinion

HANDLED: tuple[type[BaseModel], ...] = (
    CollectRecords,
    RemindRecords,
    ReconcileIdentity,
    CaseCancelled,
    EncapsulatedReport,
)
BY_TYPE = {m.TYPE: m for m in HANDLED}  # type: ignore[attr-defined]


def handle(session: Session, event: CloudEvent, settings: Settings | None = None) -> None:
    model = BY_TYPE.get(event.type)
    if model is None:
        raise PoisonMessage(
            f"records does not handle {event.type!r}; it handles {', '.join(map(repr, BY_TYPE))}"
        )
    try:
        message = model.model_validate(event.data)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors()[:5])
        raise PoisonMessage(f"{event.type} data is invalid ({exc.error_count()} error(s): {fields})") from exc
    if message.case_id != event.subject:  # type: ignore[attr-defined]
        raise PoisonMessage(f"{event.type} subject {event.subject!r} is not its data's case_id")
    settings = settings or get_settings()
    if isinstance(message, CollectRecords):
        handlers.collect(message, session, settings)
    elif isinstance(message, RemindRecords):
        handlers.remind(message, session)
    elif isinstance(message, ReconcileIdentity):
        handlers.reconcile(message, session, settings)
        second_opinion.place_waiting_reports(message.case_id, session, settings)
    elif isinstance(message, CaseCancelled):
        handlers.cancel(message, session)
    elif isinstance(message, EncapsulatedReport):
        second_opinion.store_report(message, session, settings)
