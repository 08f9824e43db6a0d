"""HTTP API: the specialist's worklist, offers, drafts, findings and follow-up answers; the routers assembled."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Response
from fastapi.exceptions import RequestValidationError
from sqlmodel import Session, col, select

from contracts.commands import MatchSpecialist
from services.auth import Caller, Role, authenticate, require_role
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.config import Settings
from services.common.fhir import undeclared_router
from services.common.http import fhir_json_only
from services.review import addenda, followup, handlers, offers
from services.review.api_directory import fhir_practitioners, specialists
from services.review.api_reports import fhir, negotiate_report_format, reports
from services.review.deps import (
    Access,
    AccessDep,
    CurrentReviewer,
    SessionDep,
    SettingsDep,
    relay,
    review_engine,
)
from services.review.models import (
    WORKLIST_STATUSES,
    AddendumCreate,
    AddendumPublic,
    Answer,
    Decline,
    FollowUpQuestion,
    QuestionPublic,
    Review,
    ReviewAddendum,
    ReviewDetail,
    ReviewDraft,
    ReviewFindings,
    ReviewStatus,
    Specialist,
    WorkItem,
)
from services.review.offers import ReviewStateError
from services.review.report_signing import ReportSigningUnavailable
from services.review.stats import ReviewStats, review_stats

__all__ = ["negotiate_report_format", "review_engine", "router"]

T = TypeVar("T")

# Specialists (as themselves) and operations; partners read reports, not reviews (404 on any review).
reviews = APIRouter(
    prefix="/v1/reviews",
    tags=["reviews"],
    dependencies=[Depends(authenticate)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
NOT_YOURS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such review offered to or accepted by the caller"}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "the review's state does not allow it; the detail says why"}
}
UNSIGNABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "the new report version could not be signed; nothing was recorded, retry (Retry-After)"
    }
}


@reviews.get(
    "",
    response_model=list[WorkItem],
    responses={404: {"description": "unknown reviewer"}},
    dependencies=[Depends(require_role(Role.SPECIALIST, Role.OPERATIONS))],
)
def worklist(
    session: SessionDep, reviewer: CurrentReviewer, caller: Caller, status: ReviewStatus | None = None
) -> list[WorkItem]:
    """The reviewer's offers, accepted and submitted reviews (with open follow-up questions), soonest due first.
    A specialist's own key lists only those: reviews they declined, or that were withdrawn from them, are
    operations' to list (`status=declined`, `status=withdrawn`), no longer theirs."""
    if reviewer is None:
        raise RequestValidationError(
            [{"loc": ("query", "reviewer"), "msg": "Field required", "type": "missing"}]
        )
    if session.get(Specialist, reviewer) is None:
        raise HTTPException(
            404, f"no specialist {reviewer!r} in the directory; GET /v1/specialists lists them"
        )
    statuses: tuple[str, ...] = (status,) if status else WORKLIST_STATUSES
    if caller.role == Role.SPECIALIST:
        statuses = tuple(s for s in statuses if s in WORKLIST_STATUSES)
    query = select(Review).where(Review.reviewer_id == reviewer, col(Review.status).in_(statuses))
    rows = session.exec(query.order_by(col(Review.due_at), col(Review.assigned_at))).all()
    items = [_work_item(r, _questions(session, r)) for r in rows]
    # Work still to do (offers, accepted reviews, unanswered questions) first, soonest due first; then done.
    return sorted(items, key=lambda w: w.status == "submitted" and w.open_questions == 0)


@reviews.get("/stats", response_model=ReviewStats, dependencies=[Depends(require_role(Role.OPERATIONS))])
def stats(session: SessionDep) -> ReviewStats:
    """Concordance and turnaround per subspecialty and per reviewer, for the quality meetings."""
    return review_stats(session.exec(select(Review)).all())


@reviews.get("/{review_id}", response_model=ReviewDetail, responses=NOT_YOURS)
def review_detail(
    review_id: str, session: SessionDep, settings: SettingsDep, reviewer: CurrentReviewer, access: AccessDep
) -> ReviewDetail:
    return _detail(session, _review_or_404(session, review_id, reviewer, access, held=True), settings)


@reviews.post("/{review_id}/accept", response_model=ReviewDetail, responses=NOT_YOURS | CONFLICT)
def accept_offer(
    review_id: str, session: SessionDep, settings: SettingsDep, reviewer: CurrentReviewer, access: AccessDep
) -> ReviewDetail:
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    _apply(lambda: offers.accept(review, session))
    session.commit()
    relay.wake()
    return _detail(session, review, settings)


@reviews.post("/{review_id}/decline", response_model=ReviewDetail, responses=NOT_YOURS | CONFLICT)
def decline_offer(
    review_id: str,
    body: Decline,
    session: SessionDep,
    settings: SettingsDep,
    reviewer: CurrentReviewer,
    access: AccessDep,
) -> ReviewDetail:
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    _apply(lambda: offers.decline(review, body.reason, session))
    session.commit()
    relay.wake()
    return _detail(session, review, settings)


@reviews.put("/{review_id}/draft", response_model=ReviewDetail, responses=NOT_YOURS | CONFLICT)
def save_draft(
    review_id: str,
    draft: ReviewDraft,
    session: SessionDep,
    settings: SettingsDep,
    reviewer: CurrentReviewer,
    access: AccessDep,
) -> ReviewDetail:
    """Save unfinished findings; any part may be missing until submission."""
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    if review.status != "accepted":
        raise HTTPException(409, offers.closed_reason(review, "drafted"))
    review.draft = draft.model_dump(mode="json", exclude_none=True)
    session.add(review)
    session.commit()
    return _detail(session, review, settings)


@reviews.post("/{review_id}", response_model=ReviewDetail, responses=NOT_YOURS | CONFLICT)
def submit_review(
    review_id: str,
    findings: ReviewFindings,
    session: SessionDep,
    settings: SettingsDep,
    reviewer: CurrentReviewer,
    access: AccessDep,
) -> ReviewDetail:
    """The specialist's second opinion; it is final once submitted (corrections are addenda)."""
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    _only_the_reviewer_signs(access, "submit findings")
    if review.submitted_at is not None:
        raise HTTPException(
            409,
            f"review {review_id} was already submitted at {review.submitted_at.isoformat()}; "
            "corrections are addenda",
        )
    if review.status != "accepted":
        raise HTTPException(409, offers.closed_reason(review, "submitted"))
    if problems := findings.submission_problems(review.exam_type):
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": message, "type": "value_error"} for field, message in problems]
        )
    handlers.submit(review, findings, session)
    session.commit()
    relay.wake()
    return _detail(session, review, settings)


@reviews.post(
    "/{review_id}/questions/{question_id}/answer",
    response_model=QuestionPublic,
    responses=NOT_YOURS | CONFLICT | UNSIGNABLE,
)
def answer_question(
    review_id: str,
    question_id: str,
    body: Answer,
    session: SessionDep,
    settings: SettingsDep,
    reviewer: CurrentReviewer,
    access: AccessDep,
) -> QuestionPublic:
    """Answer a follow-up question: the report gets a new version with the answer as an addendum."""
    # The review first, as the case's cancellation and an addendum lock it: one at a time, never a deadlock.
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    _only_the_reviewer_signs(access, "answer a follow-up question")
    question = session.exec(
        select(FollowUpQuestion)
        .where(FollowUpQuestion.id == question_id, FollowUpQuestion.review_id == review.id)
        .with_for_update()
    ).first()
    if question is None:
        raise HTTPException(404, "this review has no such follow-up question; its detail lists them")
    _apply(lambda: followup.answer(review, question, body.answer, session, settings))
    session.commit()
    relay.wake()
    return QuestionPublic.of(question)


@reviews.post(
    "/{review_id}/addenda",
    status_code=201,
    response_model=AddendumPublic,
    responses=NOT_YOURS
    | CONFLICT
    | UNSIGNABLE
    | {
        200: {"description": "a repeated request: the addendum it signed before (Idempotent-Replayed: true)"},
        403: {"description": "only the reviewing specialist's own key signs"},
    },
)
def add_addendum(
    review_id: str,
    body: AddendumCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    reviewer: CurrentReviewer,
    access: AccessDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="repeat the POST safely: the same key and body answer the addendum signed the first time",
        ),
    ] = None,
) -> AddendumPublic:
    """Add to the report you signed, unasked (a correction, an additional finding, a late comparison): the
    report gets a new version with it as an addendum, delivered to the referring physician like an answer.
    Sent twice (the same Idempotency-Key, or without one the same kind and text as your latest addendum), it
    signs one addendum: the repeat is answered 200 with it."""
    review = _review_or_404(session, review_id, reviewer, access, for_update=True)
    _only_the_reviewer_signs(access, "add an addendum to the report")
    try:
        addendum, repeated = _apply(
            lambda: addenda.add(review, body, session, settings, idempotency_key=idempotency_key)
        )
    except addenda.IdempotencyMismatch:
        raise HTTPException(
            422,
            "this Idempotency-Key already signed another addendum of this review; use a new key for a new addendum",
        ) from None
    if repeated:
        answer = AddendumPublic.of(addendum)
        session.rollback()  # nothing was written; the review's lock goes
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        return answer
    session.commit()
    relay.wake()
    return AddendumPublic.of(addendum)


router = APIRouter()
for _router in (specialists, reviews, reports, fhir, fhir_practitioners):
    router.include_router(_router)
# Under /fhir, what none of the routes above takes is answered as the CapabilityStatement at the public base
# declares it (405 naming what DiagnosticReport supports, 404 naming the types served). Practitioner and
# PractitionerRole are internal: read on this service's own port, never routed by the ingress.
router.include_router(
    undeclared_router("review", internal={"Practitioner": ["read"], "PractitionerRole": ["read"]}),
    prefix="/fhir",
    dependencies=[Depends(fhir_json_only)],
)


def _apply(action: Callable[[], T]) -> T:
    try:
        return action()
    except ReviewStateError as exc:
        raise HTTPException(409, str(exc)) from exc
    except ReportSigningUnavailable as exc:
        # Nothing is committed: the addendum or answer is not recorded, no report goes out unsigned.
        raise HTTPException(
            503,
            f"{exc}. Your text was not recorded; send it again in a few minutes (the service logged report.signing_failed for operations).",
            headers={"Retry-After": "300"},
        ) from exc


def _only_the_reviewer_signs(access: Access, what: str) -> None:
    """The report says "electronically signed by" the reviewer: only their own key signs. The operations desk
    may accept or decline an offer on a specialist's behalf, never sign for them."""
    if access.caller.role != Role.SPECIALIST:
        raise HTTPException(403, f"only the reviewing specialist, with their own key, may {what}")


def _review_or_404(
    session: Session,
    review_id: str,
    reviewer: str | None,
    access: Access,
    *,
    for_update: bool = False,
    held: bool = False,
) -> Review:
    """The review, if the caller may act on it. With `held`, a specialist's key must still hold it (offered,
    accepted or signed): the case of a review they declined, or that was withdrawn from them, is not theirs to
    read (services.review.access); acting on it is a 409 saying what happened to it."""
    query = select(Review).where(Review.id == review_id)
    review = session.exec(query.with_for_update() if for_update else query).first()
    # Someone else's review is answered exactly like a missing one: its existence is not the caller's business.
    partner = access.caller.role == Role.PARTNER
    let_go = (
        held
        and review is not None
        and access.caller.role == Role.SPECIALIST
        and review.status not in WORKLIST_STATUSES
    )
    if review is None or partner or let_go or (reviewer is not None and review.reviewer_id != reviewer):
        raise access.deny(
            "review",
            review.case_id if review else None,
            "no such review offered to or accepted by you; GET /v1/reviews lists yours",
        )
    access.allow("review", review.case_id)
    return review


def _questions(session: Session, review: Review) -> list[FollowUpQuestion]:
    query = select(FollowUpQuestion).where(FollowUpQuestion.review_id == review.id)
    return list(session.exec(query.order_by(col(FollowUpQuestion.asked_at))).all())


def _own_addenda(session: Session, review: Review) -> list[ReviewAddendum]:
    query = select(ReviewAddendum).where(ReviewAddendum.review_id == review.id)
    return list(session.exec(query.order_by(col(ReviewAddendum.signed_at))).all())


def _work_item(review: Review, questions: list[FollowUpQuestion]) -> WorkItem:
    return WorkItem(
        review_id=review.id,
        case_id=review.case_id,
        status=review.status,  # type: ignore[arg-type]
        subspecialty=review.subspecialty,
        exam_type=review.exam_type,
        clinical_question=review.request["clinical_question"],
        urgency=review.urgency,
        due_at=review.due_at,
        assigned_at=review.assigned_at,
        open_questions=sum(q.status == "open" for q in questions),
    )


def _detail(session: Session, review: Review, settings: Settings) -> ReviewDetail:
    request = MatchSpecialist.model_validate(review.request)
    questions = _questions(session, review)
    records_url = f"{settings.records_url}/v1/records/{review.case_id}"
    return ReviewDetail(
        **_work_item(review, questions).model_dump(),
        reviewer_id=review.reviewer_id,
        reason=request.reason,
        procedure_scheduled_on=request.procedure_scheduled_on,
        gestational_age_weeks=request.gestational_age_weeks,
        exam=request.exam,
        patient_sex=request.patient.sex,
        patient_age_years=_age(request.patient.birth_date, request.exam.performed_on),
        original_report=request.original_report,
        study=request.study,
        records_url=records_url,
        adequacy_warnings=request.adequacy_warnings,
        dicomweb_study_url=f"{settings.records_url}/dicomweb/studies/{request.study.study_instance_uid}",
        match_explanation=review.match_explanation,
        findings=ReviewFindings.of(review),
        draft=ReviewDraft.model_validate(review.draft) if review.draft else None,
        submitted_at=review.submitted_at,
        accepted_at=review.accepted_at,
        declined_at=review.declined_at,
        decline_reason=review.decline_reason,
        withdrawn_at=review.withdrawn_at,
        withdrawn_reason=review.withdrawn_reason,
        questions=[QuestionPublic.of(q) for q in questions],
        addenda=[AddendumPublic.of(a) for a in _own_addenda(session, review)],
    )


def _age(birth_date: date, on: date) -> int:
    return on.year - birth_date.year - ((on.month, on.day) < (birth_date.month, birth_date.day))
