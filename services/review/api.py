"""HTTP API: the specialist directory, the reviewer's worklist and findings, the integrated reports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts.commands import MatchSpecialist
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.review import handlers
from services.review.diagnostic_report import FHIR_JSON, operation_outcome
from services.review.models import (
    Report,
    Review,
    ReviewDetail,
    ReviewFindings,
    ReviewStatus,
    Specialist,
    SpecialistPublic,
    WorkItem,
)

PDF = "application/pdf"
ReportFormat = Literal["pdf", "fhir"]
REPORT_MEDIA_TYPES: dict[str, ReportFormat] = {PDF: "pdf", FHIR_JSON: "fhir", "application/json": "fhir"}


def review_engine() -> Engine:
    return get_engine("review")


def get_session(engine: Annotated[Engine, Depends(review_engine)]) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _relay_polls_anyway() -> None:
    pass


# After a commit that wrote to the outbox: main.py points this at the runtime's relay so the event goes out
# at once; without it (tests, scripts) the relay's 0.5 s poll still publishes it.
wake_relay: Callable[[], None] = _relay_polls_anyway


specialists = APIRouter(prefix="/v1/specialists", tags=["specialists"])
reviews = APIRouter(prefix="/v1/reviews", tags=["reviews"])
reports = APIRouter(prefix="/v1/reports", tags=["reports"])
fhir = APIRouter(prefix="/fhir/DiagnosticReport", tags=["fhir"])


@specialists.get("", response_model=list[SpecialistPublic])
def list_specialists(session: SessionDep) -> list[Specialist]:
    return list(session.exec(select(Specialist).order_by(Specialist.id)).all())


@reviews.get("", response_model=list[WorkItem], responses={404: {"description": "unknown reviewer"}})
def worklist(
    session: SessionDep,
    reviewer: Annotated[str, Query(min_length=1, description="the specialist's id, e.g. spec-ob-1")],
    status: ReviewStatus | None = None,
) -> list[WorkItem]:
    """The reviewer's reviews, the soonest due first."""
    if session.get(Specialist, reviewer) is None:
        raise HTTPException(
            404, f"no specialist {reviewer!r} in the directory; GET /v1/specialists lists them"
        )
    query = select(Review).where(Review.reviewer_id == reviewer)
    if status is not None:
        query = query.where(Review.status == status)
    rows = session.exec(query.order_by(Review.due_at, Review.assigned_at)).all()  # type: ignore[arg-type]
    return [_work_item(r) for r in rows]


@reviews.get("/{review_id}", response_model=ReviewDetail, responses={404: {"description": "unknown review"}})
def review_detail(review_id: str, session: SessionDep, settings: SettingsDep) -> ReviewDetail:
    return _detail(_review_or_404(session, review_id), settings)


@reviews.post(
    "/{review_id}",
    response_model=ReviewDetail,
    responses={404: {"description": "unknown review"}, 409: {"description": "already submitted"}},
)
def submit_review(
    review_id: str, findings: ReviewFindings, session: SessionDep, settings: SettingsDep
) -> ReviewDetail:
    """The specialist's second opinion; it is final once submitted (corrections are addenda)."""
    review = _review_or_404(session, review_id, for_update=True)
    if review.submitted_at is not None:
        raise HTTPException(
            409,
            f"review {review_id} was already submitted at {review.submitted_at.isoformat()}; "
            "corrections are addenda",
        )
    handlers.submit(review, findings, session)
    session.commit()
    wake_relay()
    return _detail(review, settings)


@reports.get(
    "/{case_id}",
    responses={
        200: {"content": {FHIR_JSON: {}, PDF: {}}, "description": "the DiagnosticReport or the PDF"},
        404: {"description": "no report for the case yet"},
        406: {"description": "neither PDF nor FHIR JSON is acceptable"},
    },
)
def get_report(
    case_id: str,
    session: SessionDep,
    settings: SettingsDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """The integrated report: `Accept: application/pdf` for the PDF, otherwise the FHIR DiagnosticReport."""
    report_format = negotiate_report_format(accept)
    if report_format is None:
        raise HTTPException(406, f"the report is available as {', '.join(REPORT_MEDIA_TYPES)}; ask for one")
    report = session.exec(select(Report).where(Report.case_id == case_id)).first()
    if report is None:
        raise HTTPException(
            404, f"case {case_id} has no report yet; it is composed after the review is submitted"
        )
    headers = {"Vary": "Accept"}
    if report_format == "pdf":
        pdf = handlers.report_pdf_file(settings, report).read_bytes()
        headers |= {
            "ETag": f'"{report.pdf_sha256}"',
            "Content-Disposition": f'inline; filename="second-opinion-{case_id}.pdf"',
        }
        return Response(pdf, media_type=PDF, headers=headers)
    return JSONResponse(report.diagnostic_report, media_type=FHIR_JSON, headers=headers)


@fhir.get("/{report_id}", responses={200: {"content": {FHIR_JSON: {}}}, 404: {"content": {FHIR_JSON: {}}}})
def read_diagnostic_report(report_id: str, session: SessionDep) -> JSONResponse:
    report = session.get(Report, report_id)
    if report is None:
        outcome = operation_outcome("not-found", f"DiagnosticReport/{report_id} does not exist")
        return JSONResponse(outcome, status_code=404, media_type=FHIR_JSON)
    return JSONResponse(report.diagnostic_report, media_type=FHIR_JSON)


router = APIRouter()
for _router in (specialists, reviews, reports, fhir):
    router.include_router(_router)


def negotiate_report_format(accept: str | None) -> ReportFormat | None:
    """The best acceptable format: highest q first, an exact type before a wildcard; FHIR JSON by default."""
    if accept is None or not accept.strip():
        return "fhir"
    best: tuple[float, int, ReportFormat] | None = None
    for entry in accept.split(","):
        media, *params = (p.strip() for p in entry.split(";"))
        media = media.lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        report_format = REPORT_MEDIA_TYPES.get(media) or (
            "fhir" if media in ("*/*", "application/*") else None
        )
        if report_format is None or q <= 0:
            continue
        rank = (q, int(media in REPORT_MEDIA_TYPES), report_format)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return best[2] if best else None


def _review_or_404(session: Session, review_id: str, *, for_update: bool = False) -> Review:
    query = select(Review).where(Review.id == review_id)
    review = session.exec(query.with_for_update() if for_update else query).first()
    if review is None:
        raise HTTPException(404, f"review {review_id} does not exist; GET /v1/reviews?reviewer=… lists yours")
    return review


def _work_item(review: Review) -> WorkItem:
    return WorkItem(
        review_id=review.id,
        case_id=review.case_id,
        status=review.status,
        subspecialty=review.subspecialty,
        exam_type=review.exam_type,
        clinical_question=review.request["clinical_question"],
        urgency=review.urgency,
        due_at=review.due_at,
        assigned_at=review.assigned_at,
    )


def _detail(review: Review, settings: Settings) -> ReviewDetail:
    request = MatchSpecialist.model_validate(review.request)
    return ReviewDetail(
        **_work_item(review).model_dump(),
        reviewer_id=review.reviewer_id,
        reason=request.reason,
        exam=request.exam,
        patient_sex=request.patient.sex,
        patient_age_years=_age(request.patient.birth_date, request.exam.performed_on),
        original_report=request.original_report,
        study=request.study,
        records_url=f"{settings.records_url}/v1/records/{review.case_id}",
        findings=ReviewFindings.of(review),
        submitted_at=review.submitted_at,
    )


def _age(birth_date: date, on: date) -> int:
    return on.year - birth_date.year - ((on.month, on.day) < (birth_date.month, birth_date.day))
