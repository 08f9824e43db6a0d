"""An offer's life: the specialist accepts or declines; the workflow withdraws it (expiry, reassignment,
cancellation). Handlers add to the session; callers commit. A decline or withdrawal ends the specialist's access
to the case's records (services.review.access), once it commits.

ReviewStateError (409 to the specialist): the review is no longer in a state that allows the action.
"""

from __future__ import annotations

import structlog
from sqlmodel import Session, col, select

from contracts.commands import CloseReview, WithdrawOffer
from contracts.events import CaseAlert, CaseCancelled, ReviewAccepted, ReviewDeclined
from services.common.amqp import EVENTS, enqueue
from services.common.db import utcnow
from services.review import access
from services.review.handlers import event
from services.review.models import OPEN_STATUSES, FollowUpQuestion, Review, ReviewAddendum, as_utc

log = structlog.get_logger(__name__)


class ReviewStateError(Exception):
    """The action does not fit the review's state; the message says what happened to it."""


def accept(review: Review, session: Session) -> bool:
    """Accept the offer; False when it was already accepted (nothing changes)."""
    if review.status == "accepted":
        return False
    if review.status != "offered":
        raise ReviewStateError(closed_reason(review, "accepted"))
    review.status = "accepted"
    review.accepted_at = utcnow()
    session.add(review)
    # Granted when the offer was settled already; settled again (idempotent), should the grant have gone amiss.
    access.note_change(session, review.case_id, review.reviewer_id)
    accepted = ReviewAccepted(case_id=review.case_id, review_id=review.id, reviewer_id=review.reviewer_id)
    enqueue(session, EVENTS, event(f"{accepted.TYPE}:{review.id}", accepted))
    log.info("review.accepted", case_id=review.case_id, review_id=review.id)
    return True


def decline(review: Review, reason: str, session: Session) -> None:
    if review.status != "offered":
        raise ReviewStateError(closed_reason(review, "declined"))
    review.status = "declined"
    review.declined_at = utcnow()
    review.decline_reason = reason
    session.add(review)
    access.note_change(session, review.case_id, review.reviewer_id)
    declined = ReviewDeclined(
        case_id=review.case_id, review_id=review.id, reviewer_id=review.reviewer_id, reason=reason
    )
    enqueue(session, EVENTS, event(f"{declined.TYPE}:{review.id}", declined))
    log.info("review.declined", case_id=review.case_id, review_id=review.id)


def withdraw(cmd: WithdrawOffer, session: Session) -> None:
    """The workflow takes the offer (or accepted review) back; a submitted review stands."""
    review = session.exec(select(Review).where(Review.id == cmd.review_id).with_for_update()).first()
    if review is None or review.case_id != cmd.case_id:
        log.warning("review.withdraw_unknown", case_id=cmd.case_id, review_id=cmd.review_id)
        return
    if cmd.reason == "expired" and review.status == "accepted":
        # Accepted before the lapse reached us (the specialist was told so): it stands; the next match names it.
        log.info("review.withdraw_after_accept", case_id=cmd.case_id, review_id=review.id)
        return
    _withdraw(review, cmd.reason, session)


def cancel_case(cancelled: CaseCancelled, session: Session) -> None:
    """The case was cancelled: withdraw every open offer or review and every open question; a submitted review
    stands but is marked, so that its report takes no addendum (nothing more is delivered for the case)."""
    reviews = session.exec(select(Review).where(Review.case_id == cancelled.case_id).with_for_update()).all()
    for review in reviews:
        _withdraw(review, "cancelled", session)
        if review.case_cancelled_at is None:
            review.case_cancelled_at = utcnow()
            session.add(review)
    questions = session.exec(
        select(FollowUpQuestion).where(
            FollowUpQuestion.case_id == cancelled.case_id, FollowUpQuestion.status == "open"
        )
    ).all()
    for question in questions:
        question.status = "withdrawn"
        session.add(question)


def close_case(cmd: CloseReview, session: Session) -> None:
    """The case closed after follow-up: its reviews take no more addenda (nothing more would be delivered).
    An addendum signed after the case delivered its last one, as it closed, was never delivered: operations
    get a `case.alert` for each, so the referring physician is told by hand."""
    reviews = session.exec(select(Review).where(Review.case_id == cmd.case_id).with_for_update()).all()
    for review in reviews:
        if review.case_closed_at is None:
            review.case_closed_at = utcnow()
            session.add(review)
    if cmd.own_addenda_delivered is not None:
        _alert_undelivered(cmd.case_id, cmd.own_addenda_delivered, session)
    log.info("review.case_closed", case_id=cmd.case_id, reviews=len(reviews))


def _alert_undelivered(case_id: str, delivered: int, session: Session) -> None:
    signed = session.exec(
        select(ReviewAddendum)
        .where(ReviewAddendum.case_id == case_id)
        .order_by(col(ReviewAddendum.report_version))
    ).all()
    for addendum in signed[delivered:]:
        alert = CaseAlert(
            case_id=case_id,
            kind="addendum_not_delivered",
            detail=(
                f"the specialist's own addendum (report version {addendum.report_version}) was signed as the "
                "case closed and was not delivered to the referring physician: send them the current report "
                f"(GET /v1/reports/{case_id}) and record that it was sent"
            ),
            at=utcnow(),
        )
        enqueue(session, EVENTS, event(f"{alert.TYPE}:{case_id}:undelivered:{addendum.id}", alert))
        log.warning(
            "review.addendum_not_delivered",
            case_id=case_id,
            addendum_id=addendum.id,
            version=addendum.report_version,
        )


def closed_reason(review: Review, action: str) -> str:
    """Why `action` is no longer possible, for the specialist."""
    prefix = f"review {review.id} cannot be {action}:"
    if review.status == "withdrawn" and review.withdrawn_at is not None:
        at = as_utc(review.withdrawn_at).isoformat()
        if review.withdrawn_reason == "expired":
            return f"{prefix} the offer expired at {at}; it has been offered to someone else"
        return f"{prefix} the case was withdrawn from you at {at} ({review.withdrawn_reason})"
    if review.status == "declined" and review.declined_at is not None:
        return f"{prefix} you declined it at {as_utc(review.declined_at).isoformat()}"
    if review.status == "submitted" and review.submitted_at is not None:
        return f"{prefix} it was submitted at {as_utc(review.submitted_at).isoformat()}"
    if review.status == "accepted":
        return f"{prefix} it was already accepted"
    return f"{prefix} it is {review.status}; accept the offer first"


def _withdraw(review: Review, reason: str, session: Session) -> None:
    if review.status not in OPEN_STATUSES:
        return
    review.status = "withdrawn"
    review.withdrawn_at = utcnow()
    review.withdrawn_reason = reason
    session.add(review)
    access.note_change(session, review.case_id, review.reviewer_id)
    log.info("review.withdrawn", case_id=review.case_id, review_id=review.id, reason=reason)
