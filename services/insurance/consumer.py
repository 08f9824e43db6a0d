"""AMQP entrypoint: an `insurance.*` command becomes a handler call."""

from __future__ import annotations

from pydantic import ValidationError
from sqlmodel import Session

from contracts import CloudEvent, VerifyInsurance
from services.common.config import get_settings
from services.common.errors import PoisonMessage
from services.insurance import handlers


def handle(session: Session, event: CloudEvent) -> None:
    if event.type != VerifyInsurance.TYPE:
        raise PoisonMessage(f"the insurance service handles only {VerifyInsurance.TYPE}, not {event.type}")
    try:
        cmd = VerifyInsurance.model_validate(event.data)
    except ValidationError as exc:
        # Field names and messages only: the values may be member ids.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'data'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise PoisonMessage(f"{event.type} data is invalid ({problems})") from exc
    if cmd.case_id != event.subject:
        raise PoisonMessage(f"{event.type} subject {event.subject} does not match data.case_id {cmd.case_id}")
    handlers.verify(cmd, session, get_settings(), event_id=event.id)
