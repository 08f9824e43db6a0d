"""AMQP entrypoint: turns a command or event on queue `review` into a call to its handler."""

from __future__ import annotations

from pydantic import BaseModel
from sqlmodel import Session

from contracts.commands import (
    CloseReview,
    ComposeReport,
    FollowUpQuestionForReviewer,
    MatchSpecialist,
    WithdrawOffer,
)
from contracts.envelope import CloudEvent
from contracts.events import CaseCancelled
from services.common.amqp import contract_message
from services.common.config import Settings, get_settings
from services.review import followup, handlers, offers

MESSAGES: dict[str, type[BaseModel]] = {
    m.TYPE: m
    for m in (
        MatchSpecialist,
        WithdrawOffer,
        FollowUpQuestionForReviewer,
        ComposeReport,
        CloseReview,
        CaseCancelled,
    )
}


def handle(session: Session, event: CloudEvent, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    message = parse(event)
    if isinstance(message, MatchSpecialist):
        if message.withdraw is not None:  # the previous offer first, in the same transaction
            offers.withdraw(message.withdraw, session)
        handlers.match(message, session, settings, event_id=event.id)
    elif isinstance(message, WithdrawOffer):
        offers.withdraw(message, session)
    elif isinstance(message, CaseCancelled):
        offers.cancel_case(message, session)
    elif isinstance(message, FollowUpQuestionForReviewer):
        followup.ask(message, session)
    elif isinstance(message, CloseReview):
        offers.close_case(message, session)
    elif isinstance(message, ComposeReport):
        handlers.compose(message, session, settings)


def parse(event: CloudEvent) -> BaseModel:
    return contract_message(event, MESSAGES, "the review service")
