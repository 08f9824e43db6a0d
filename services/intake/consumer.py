"""AMQP entry point: turns a message into a command or event and hands it to a handler."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from contracts.commands import DeliverReport
from contracts.envelope import CloudEvent
from contracts.events import CaseAlert, CaseCancelled, CaseStatusChanged, RecordsNeeded, ReportReady
from services.common.amqp import contract_message
from services.common.config import get_settings
from services.common.errors import PoisonMessage
from services.intake import fhir_subscriptions, handlers, webhooks_out
from services.intake.fhir_service_request import fhir_base

# Events intake receives only to tell the partner; the case status itself comes from case.status_changed.
NOTIFY_PARTNER = {RecordsNeeded.TYPE, ReportReady.TYPE}
MESSAGES: dict[str, type[BaseModel]] = {
    m.TYPE: m  # type: ignore[attr-defined]
    for m in (CaseStatusChanged, CaseCancelled, CaseAlert, DeliverReport, RecordsNeeded, ReportReady)
}


def handle(session: Session, event: CloudEvent) -> None:
    message = parse(event)
    # What a message adds is flushed with the batch's commit, one statement per table, not before each
    # look-up of the next message: the handlers read cases by key (the session's own copy once loaded) and
    # endpoints, never rows a handler of the batch adds.
    try:
        with session.no_autoflush:
            _dispatch(session, event, message)
    except ValidationError as exc:
        raise PoisonMessage(f"{event.type} could not be applied: {exc.error_count()} error(s)") from exc


def parse(event: CloudEvent) -> BaseModel:
    return contract_message(event, MESSAGES, "intake")


def _dispatch(session: Session, event: CloudEvent, message: BaseModel) -> None:
    if isinstance(message, CaseStatusChanged):
        handlers.record_status(event, message, session)
        webhooks_out.fan_out(session, event)
        fhir_subscriptions.notify(session, event, fhir_base(get_settings()))
    elif isinstance(message, CaseCancelled):
        handlers.record_cancellation(event, message, session)
        webhooks_out.withdraw(session, event.subject)
    elif isinstance(message, CaseAlert):
        handlers.record_alert(event, message, session)
    elif isinstance(message, DeliverReport):
        handlers.deliver_report(event, message, session)
    elif event.type in NOTIFY_PARTNER:
        webhooks_out.fan_out(session, event)
        fhir_subscriptions.notify(session, event, fhir_base(get_settings()))
