"""Addenda the specialist adds on their own to the report they signed (a correction, an additional finding,
a comparison with prior imaging received late). Each is a new version of the report, delivered to the
referring physician by the case workflow like an answer's addendum. Handlers add to the session; callers
commit.

ReviewStateError (409 to the specialist): the case or report is not in a state that takes an addendum.
IdempotencyMismatch (422): an Idempotency-Key already used for another addendum.

A POST sent twice (a double click, a retry after a lost answer) signs one addendum: with the same
Idempotency-Key it answers the addendum that key signed; without a key, an addendum identical to the
review's latest one (same kind, same text) is that one again.
"""

from __future__ import annotations

import uuid

import structlog
from sqlmodel import Session, col, func, select

from contracts.events import ReportAddended
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.review.handlers import event, reissue
from services.review.models import AddendumCreate, Report, Review, ReviewAddendum, as_utc
from services.review.offers import ReviewStateError, closed_reason

MAX_ADDENDA = 10

log = structlog.get_logger(__name__)


class IdempotencyMismatch(Exception):
    """The Idempotency-Key signed another addendum of this review."""


def add(
    review: Review,
    body: AddendumCreate,
    session: Session,
    settings: Settings,
    *,
    idempotency_key: str | None = None,
) -> tuple[ReviewAddendum, bool]:
    """Record the addendum and issue the report again with it; the caller holds the review row locked.
    Returns the addendum and whether it was signed before (a repeated request: nothing new is signed)."""
    earlier = _repeated(review, body, session, idempotency_key)
    if earlier is not None:
        log.info(
            "review.addendum_repeated", case_id=review.case_id, review_id=review.id, addendum_id=earlier.id
        )
        return earlier, True
    if review.case_cancelled_at is not None:
        raise ReviewStateError(
            f"case {review.case_id} was cancelled at {as_utc(review.case_cancelled_at).isoformat()}; "
            "nothing more is delivered for it, so its report takes no addendum. Call operations if the "
            "referring physician must still be told."
        )
    if review.case_closed_at is not None:
        raise ReviewStateError(
            f"case {review.case_id} closed at {as_utc(review.case_closed_at).isoformat()}; nothing more is "
            "delivered for it, so its report takes no addendum. Tell the referring physician directly and ask "
            "operations to record it."
        )
    if review.status != "submitted":
        raise ReviewStateError(
            f"{closed_reason(review, 'given an addendum')}; an addendum adds to a submitted review's report"
        )
    report = session.exec(select(Report).where(Report.case_id == review.case_id).with_for_update()).first()
    if report is None or report.review_id != review.id:
        raise ReviewStateError(
            f"case {review.case_id} has no report yet (it is composed shortly after submission); add the "
            f"addendum once GET /v1/reports/{review.case_id} returns it"
        )
    if not report.own_addenda_delivered:
        raise ReviewStateError(
            f"case {review.case_id} began before the case delivered the specialist's own addenda, so this one "
            "would not reach the referring physician. Tell them directly and ask operations to record it."
        )
    count = session.exec(
        select(func.count()).select_from(ReviewAddendum).where(ReviewAddendum.review_id == review.id)
    ).one()
    if count >= MAX_ADDENDA:
        raise ReviewStateError(
            f"the report already has {count} addenda of yours, the most one report takes; call operations "
            "to have the case reviewed again"
        )
    addendum = ReviewAddendum(
        id=str(uuid.uuid4()),
        case_id=review.case_id,
        review_id=review.id,
        kind=body.kind,
        text=body.text,
        report_version=report.version + 1,
        idempotency_key=idempotency_key,
    )
    session.add(addendum)
    reissue(report, review, session, settings)
    added = ReportAddended(
        case_id=review.case_id,
        review_id=review.id,
        report_id=report.id,
        addendum_id=addendum.id,
        version=report.version,
    )
    enqueue(session, EVENTS, event(f"{added.TYPE}:{review.case_id}:{addendum.id}", added))
    log.info(
        "review.addendum_signed",
        case_id=review.case_id,
        review_id=review.id,
        addendum_id=addendum.id,
        kind=body.kind,
        version=report.version,
    )
    return addendum, False


def _repeated(
    review: Review, body: AddendumCreate, session: Session, idempotency_key: str | None
) -> ReviewAddendum | None:
    """The addendum this request already signed, if it is a repeat."""
    if idempotency_key is not None:
        earlier = session.exec(
            select(ReviewAddendum).where(
                ReviewAddendum.review_id == review.id, ReviewAddendum.idempotency_key == idempotency_key
            )
        ).first()
        if earlier is not None and (earlier.kind, earlier.text) != (body.kind, body.text):
            raise IdempotencyMismatch()
        return earlier
    latest = session.exec(
        select(ReviewAddendum)
        .where(ReviewAddendum.review_id == review.id)
        .order_by(col(ReviewAddendum.report_version).desc())
        .limit(1)
    ).first()
    if latest is not None and (latest.kind, latest.text) == (body.kind, body.text):
        return latest
    return None
