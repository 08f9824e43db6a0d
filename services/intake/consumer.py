"""AMQP entry point: turns a message into a command or event and hands it to a handler."""

from __future__ import annotations

from pydantic import ValidationError
from sqlmodel import Session

from contracts.commands import DeliverReport
from contracts.envelope import CloudEvent
from contracts.events import CaseAlert, CaseCancelled, CaseStatusChanged
from services.common.errors import PoisonMessage
from services.intake import handlers, webhooks_out

# Events intake receives only to tell the partner; the case status itself comes from case.status_changed.
NOTIFY_PARTNER = {"records.needed", "report.ready"}


def handle(session: Session, event: CloudEvent) -> None:
    # What a message adds is flushed with the batch's commit, one statement per table, not before each
    # look-up of the next message: the handlers read cases by key (the session's own copy once loaded) and
    # endpoints, never rows a handler of the batch adds.
    try:
        with session.no_autoflush:
            _dispatch(session, event)
    except ValidationError as exc:
        raise PoisonMessage(f"{event.type} data is invalid: {exc.error_count()} error(s)") from exc


def _dispatch(session: Session, event: CloudEvent) -> None:
    if event.type == CaseStatusChanged.TYPE:
        handlers.record_status(event, CaseStatusChanged.model_validate(event.data), session)
        webhooks_out.fan_out(session, event)
    elif event.type == CaseCancelled.TYPE:
        handlers.record_cancellation(event, CaseCancelled.model_validate(event.data), session)
        webhooks_out.withdraw(session, event.subject)
    elif event.type == CaseAlert.TYPE:
        handlers.record_alert(event, CaseAlert.model_validate(event.data), session)
    elif event.type == DeliverReport.TYPE:
        handlers.deliver_report(event, DeliverReport.model_validate(event.data), session)
    elif event.type in NOTIFY_PARTNER:
        webhooks_out.fan_out(session, event)
    else:
        raise PoisonMessage(f"intake does not handle {event.type!r}")
