"""AMQP entry point: turns a `records.*` command or a `case.cancelled` event into a handler call."""

from __future__ import annotations

from pydantic import BaseModel
from sqlmodel import Session

from contracts.commands import CollectRecords, ReconcileIdentity, RemindRecords
from contracts.envelope import CloudEvent
from contracts.events import CaseCancelled, EncapsulatedReport
from services.common.amqp import contract_message
from services.common.config import Settings, get_settings
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
    message = contract_message(event, BY_TYPE, "records")
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
