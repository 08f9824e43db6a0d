"""Follow-up questions after delivery: each is a task for the specialist who reviewed the case, and its
answer is an addendum (a new version of the report). Handlers add to the session; callers commit."""

from __future__ import annotations

import structlog
from sqlmodel import Session, func, select

from contracts.commands import FollowUpQuestionForReviewer
from contracts.events import QuestionAnswered
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.db import utcnow
from services.common.errors import PoisonMessage
from services.review.handlers import event, reissue
from services.review.models import FollowUpQuestion, Report, Review, as_utc
from services.review.offers import ReviewStateError

MAX_QUESTIONS = 3

log = structlog.get_logger(__name__)


def ask(cmd: FollowUpQuestionForReviewer, session: Session) -> None:
    if session.get(FollowUpQuestion, (cmd.question_id, cmd.case_id)) is not None:
        return
    query = select(Review).where(Review.case_id == cmd.case_id, Review.status == "submitted")
    if cmd.review_id:
        query = query.where(Review.id == cmd.review_id)
    review = session.exec(query).first()
    if review is None:
        raise PoisonMessage(f"case {cmd.case_id} has no submitted review to ask a follow-up question about")
    asked = session.exec(
        select(func.count()).select_from(FollowUpQuestion).where(FollowUpQuestion.case_id == cmd.case_id)
    ).one()
    if asked >= MAX_QUESTIONS:
        raise PoisonMessage(
            f"case {cmd.case_id} already has {asked} follow-up questions; at most {MAX_QUESTIONS}"
        )
    session.add(
        FollowUpQuestion(
            id=cmd.question_id, case_id=cmd.case_id, review_id=review.id, text=cmd.text, asked_by=cmd.asked_by
        )
    )
    log.info("review.question_asked", case_id=cmd.case_id, review_id=review.id, question_id=cmd.question_id)


def answer(
    review: Review, question: FollowUpQuestion, text: str, session: Session, settings: Settings
) -> Report:
    """Record the answer and issue the report again with it as an addendum; the caller holds the review row
    locked (the case's cancellation withdraws its questions under that lock)."""
    if question.status == "withdrawn" and review.case_cancelled_at is not None:
        raise ReviewStateError(
            f"question {question.id} was withdrawn: case {review.case_id} was cancelled at "
            f"{as_utc(review.case_cancelled_at).isoformat()}, so nothing more is delivered for it. Call "
            "operations if the referring physician must still be told."
        )
    if question.status != "open":
        raise ReviewStateError(f"question {question.id} is {question.status}; an answer cannot be changed")
    report = session.exec(select(Report).where(Report.case_id == review.case_id).with_for_update()).first()
    if report is None:
        raise ReviewStateError(f"case {review.case_id} has no report yet; answer once it has been composed")
    question.status = "answered"
    question.answer = text
    question.answered_at = utcnow()
    session.add(question)
    reissue(report, review, session, settings)
    answered = QuestionAnswered(
        case_id=review.case_id, question_id=question.id, review_id=review.id, report_id=report.id
    )
    enqueue(session, EVENTS, event(f"{answered.TYPE}:{review.case_id}:{question.id}", answered))
    log.info(
        "review.question_answered", case_id=review.case_id, question_id=question.id, version=report.version
    )
    return report
