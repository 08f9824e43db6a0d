"""Which specialists may read a case's PHI in every service (records' images and documents, its report), and
keeping the auth registry (services.auth.tenancy) in step with the reviews here.

A specialist reads a case while it is offered to them (to decide), while it is assigned to them (accepted),
and afterwards as the author of its signed report: through follow-up questions and addenda, and after the case
closes or is cancelled, because the signed opinion is a medical record they answer for and may be asked about,
and the report's DICOM download reads records with their own key. Once they decline, the offer lapses, or the
case is withdrawn from them before they signed (reassigned, cancelled), they read nothing of it: the same 404
a stranger gets. The worklist and review API apply the same rule to the reviews themselves.

Each change of a review that may change this notes its (case, specialist) pair in `reviewer_access_changes`,
in the change's own transaction. Once it commits, the pair is settled: under a lock on the pair in the auth
schema, this specialist's reviews of the case are read as committed now, and the registry is made to say the
same, granted or revoked with an audit entry (`tenancy.settle_reviewer`). The note is deleted after that.

- Ordering: what is applied is read under the lock, never carried from the change, so settlements that race
  (an offer's grant delayed past the decline that followed it) end with the state committed last.
- Durability: a settlement that did not happen (the process died after the commit, the auth schema did not
  answer) leaves its note; `SettlingLoop` settles noted pairs at start and every `RETRY_SECONDS`.
- Redelivery: a message applied again changes no review, notes nothing; a settlement again writes nothing.
"""

from __future__ import annotations

import threading

import structlog
from sqlalchemy import delete, tuple_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from services.auth import tenancy
from services.auth.models import CaseReviewer
from services.auth.tenancy import ReviewerStanding
from services.common.db import after_commit, engine_of, get_engine
from services.review.models import WORKLIST_STATUSES, Review, ReviewerAccessChange

log = structlog.get_logger(__name__)

SERVICE = "review"
RETRY_SECONDS = 30.0  # a settlement that failed is tried again this often (the auth schema was unreachable)
BATCH = 100  # pairs settled per look at the notes

WHY = {
    "offered": "the case is offered to them",
    "accepted": "the case is assigned to them",
    "submitted": "they signed the case's second opinion",
    "declined": "they declined the offer",
}
WITHDRAWN_WHY = {
    "expired": "the offer lapsed",
    "reassigned": "the case was reassigned",
    "cancelled": "the case was cancelled",
}


def note_change(session: Session, case_id: str, specialist_id: str) -> None:
    """Note that the specialist's reviews of the case changed; settle their access once the session commits."""
    session.add(ReviewerAccessChange(case_id=case_id, specialist_id=specialist_id))
    engine = engine_of(session)
    after_commit(session, lambda: _settle_now(engine, case_id, specialist_id))


def standing(engine: Engine, case_id: str, specialist_id: str) -> ReviewerStanding:
    """Whether the specialist may read the case, from their reviews of it as committed now."""
    with Session(engine) as session:
        reviews = session.exec(
            select(Review)
            .where(Review.case_id == case_id, Review.reviewer_id == specialist_id)
            .order_by(col(Review.assigned_at).desc())
        ).all()
    held = next((r for r in reviews if r.status in WORKLIST_STATUSES), None)
    if held is not None:
        return ReviewerStanding(True, f"{WHY[held.status]} (review {held.id})")
    if not reviews:
        return ReviewerStanding(False, "no review of the case is theirs")
    last = reviews[0]
    reason = last.withdrawn_reason or last.status
    why = WHY.get(last.status) or WITHDRAWN_WHY.get(reason, f"the case was withdrawn from them ({reason})")
    return ReviewerStanding(False, f"{why} (review {last.id})")


def settle(engine: Engine, auth: Engine, case_id: str, specialist_id: str) -> bool | None:
    """Make the auth registry match the specialist's reviews of the case, then drop the notes it settled
    (only those read before: a change noted meanwhile is settled by its own turn)."""
    with Session(engine) as session:
        noted = session.exec(
            select(ReviewerAccessChange.id).where(
                ReviewerAccessChange.case_id == case_id, ReviewerAccessChange.specialist_id == specialist_id
            )
        ).all()
    changed = tenancy.settle_reviewer(
        auth, case_id, specialist_id, lambda: standing(engine, case_id, specialist_id), service=SERVICE
    )
    if noted:
        with Session(engine) as session:
            session.execute(delete(ReviewerAccessChange).where(col(ReviewerAccessChange.id).in_(noted)))
            session.commit()
    return changed


def settle_noted(engine: Engine, auth: Engine, limit: int = BATCH) -> int:
    """Settle the pairs still noted, oldest first; returns how many were settled. One that fails stays noted."""
    with Session(engine) as session:
        pairs = session.exec(
            select(ReviewerAccessChange.case_id, ReviewerAccessChange.specialist_id)
            .group_by(col(ReviewerAccessChange.case_id), col(ReviewerAccessChange.specialist_id))
            .order_by(func.min(ReviewerAccessChange.id))
            .limit(limit)
        ).all()
    settled = 0
    for case_id, specialist_id in pairs:
        try:
            settle(engine, auth, case_id, specialist_id)
            settled += 1
        except Exception as exc:
            log.warning("review.access_settle_failed", case_id=case_id, error=type(exc).__name__)
    return settled


def sweep_registry(engine: Engine, auth: Engine, page: int = 500) -> int:
    """Settle every pair the registry grants, whether noted or not; returns how many were revoked. Declines and
    withdrawals written by a review service from before the notes (during a rolling upgrade, after the
    migration that noted the earlier ones) or grants of a match rolled back before grants waited for the
    commit left access no note names; this finds them."""
    revoked, after = 0, ("", "")
    while True:
        with Session(auth) as session:
            pairs = session.exec(
                select(CaseReviewer.case_id, CaseReviewer.specialist_id)
                .where(tuple_(col(CaseReviewer.case_id), col(CaseReviewer.specialist_id)) > tuple_(*after))
                .order_by(col(CaseReviewer.case_id), col(CaseReviewer.specialist_id))
                .limit(page)
            ).all()
        for case_id, specialist_id in pairs:
            revoked += settle(engine, auth, case_id, specialist_id) is False
        if len(pairs) < page:
            return revoked
        after = tuple(pairs[-1])  # type: ignore[assignment]


class SettlingLoop:
    """Settles the pairs whose settlement after their commit did not happen: at start (a process that died
    between a commit and its settlement) with a sweep of every pair the registry grants, then every
    `interval` seconds."""

    def __init__(self, engine: Engine, auth: Engine, interval: float = RETRY_SECONDS) -> None:
        self.engine, self.auth, self.interval = engine, auth, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="review-access-settling", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            revoked = sweep_registry(self.engine, self.auth)
            if revoked:
                log.info("review.access_swept", revoked=revoked)
        except Exception as exc:  # the next start sweeps again; the notes below are settled meanwhile
            log.warning("review.access_sweep_failed", error=type(exc).__name__)
        while not self._stop.is_set():
            try:
                while settle_noted(self.engine, self.auth, BATCH) == BATCH and not self._stop.is_set():
                    pass
            except Exception as exc:  # the review schema did not answer: the notes wait for the next pass
                log.warning("review.access_settling_failed", error=type(exc).__name__)
            self._stop.wait(self.interval)


def _settle_now(engine: Engine, case_id: str, specialist_id: str) -> None:
    try:
        settle(engine, get_engine("auth"), case_id, specialist_id)
    except Exception as exc:
        # The change is committed and its note with it: SettlingLoop settles it. Failing here would fail the
        # message or request whose work is already done.
        log.warning("review.access_settle_deferred", case_id=case_id, error=type(exc).__name__)
