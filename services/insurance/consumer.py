"""AMQP entrypoint: `insurance.verify` and `case.cancelled` become handler calls."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from contracts import CloudEvent, VerifyInsurance
from contracts.events import CaseCancelled
from contracts.validation import problems_of
from services.common.config import get_settings
from services.common.errors import PoisonMessage
from services.insurance import handlers

HANDLED = (VerifyInsurance.TYPE, CaseCancelled.TYPE)
M = TypeVar("M", bound=BaseModel)


def handle(session: Session, event: CloudEvent) -> None:
    if event.type == VerifyInsurance.TYPE:
        handlers.verify(_data(event, VerifyInsurance), session, get_settings(), event_id=event.id)
    elif event.type == CaseCancelled.TYPE:
        handlers.cancel(_data(event, CaseCancelled), session)
    else:
        raise PoisonMessage(f"the insurance service handles only {' and '.join(HANDLED)}, not {event.type}")


def _data(event: CloudEvent, model: type[M]) -> M:
    try:
        data = model.model_validate(event.data)
    except ValidationError as exc:
        # Field names and messages only: the values may be member ids.
        problems = problems_of(exc, whole="data", most=5)
        raise PoisonMessage(f"{event.type} data is invalid ({problems})") from exc
    case_id = getattr(data, "case_id", None)
    if case_id != event.subject:
        raise PoisonMessage(f"{event.type} subject {event.subject} does not match data.case_id {case_id}")
    return data
