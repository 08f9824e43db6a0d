"""What the review service's commands and submissions do. Handlers add to the session; callers commit."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
import uuid
from pathlib import Path

import pydicom
import structlog
from sqlmodel import Session, col, func, select

from contracts.commands import ComposeReport, MatchSpecialist
from contracts.envelope import CloudEvent, new_event
from contracts.events import (
    EncapsulatedReport,
    Event,
    ReportReady,
    ReviewAssigned,
    ReviewOffered,
    ReviewSubmitted,
    ReviewUnmatched,
)
from contracts.models import DocumentedCommunication
from services.auth import tenancy
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.db import get_engine, utcnow
from services.common.errors import PoisonMessage
from services.review import access
from services.review.diagnostic_report import build_diagnostic_report
from services.review.encapsulated_pdf import encapsulated_pdf
from services.review.matching import NoMatch, match_specialist
from services.review.models import (
    OPEN_STATUSES,
    FollowUpQuestion,
    Report,
    Review,
    ReviewAddendum,
    ReviewFindings,
    Specialist,
    as_utc,
)
from services.review.report_pdf import Addendum, ReportContent, Signature, render_report_pdf
from services.review.report_signing import ADDENDUM_ISSUED, REPORT_ISSUED, ReportSigner, sign_report_pdf

SOURCE = "/services/review"

log = structlog.get_logger(__name__)


def match(cmd: MatchSpecialist, session: Session, settings: Settings, *, event_id: str) -> None:
    """Offer the case to the best specialist, or report why nobody can take it."""
    if session.exec(select(Review.id).where(Review.match_event_id == event_id)).first() is not None:
        log.info("review.match_already_applied", case_id=cmd.case_id)
        return
    standing = session.exec(
        select(Review).where(Review.case_id == cmd.case_id, col(Review.status).in_(("accepted", "submitted")))
    ).first()
    if standing is not None:
        # Submitted (or accepted) before the workflow's withdrawal reached us: a signed opinion is never
        # dropped, nor the case given to a second reader; it answers this match instead.
        assigned = ReviewAssigned(
            case_id=cmd.case_id,
            review_id=standing.id,
            reviewer_id=standing.reviewer_id,
            subspecialty=standing.subspecialty,
            explanation=f"{standing.reviewer_id}: {standing.status} before the withdrawal arrived; it stands",
        )
        enqueue(session, EVENTS, event(f"{event_id}>{assigned.TYPE}", assigned))
        log.warning("review.match_found_standing_review", case_id=cmd.case_id, review_id=standing.id)
        return
    # Locking the directory serializes concurrent matches, so no specialist goes over their limit.
    specialists = session.exec(select(Specialist).order_by(Specialist.id).with_for_update()).all()
    open_reviews = dict(
        session.exec(
            select(Review.reviewer_id, func.count())
            .where(Review.status.in_(OPEN_STATUSES))  # type: ignore[attr-defined]
            .group_by(Review.reviewer_id)
        ).all()
    )
    result = match_specialist(cmd, specialists, open_reviews, now=utcnow())
    if isinstance(result, NoMatch):
        unmatched = ReviewUnmatched(
            case_id=cmd.case_id, subspecialty=result.subspecialty, reason=result.reason
        )
        enqueue(session, EVENTS, event(f"{event_id}>{unmatched.TYPE}", unmatched))
        log.warning("review.unmatched", case_id=cmd.case_id, subspecialty=result.subspecialty)
        return
    review = Review(
        id=str(uuid.uuid4()),
        case_id=cmd.case_id,
        reviewer_id=result.specialist.id,
        subspecialty=result.subspecialty,
        match_event_id=event_id,
        match_explanation=result.explanation,
        request=cmd.model_dump(mode="json"),
        exam_type=cmd.exam.exam_type,
        urgency=cmd.urgency,
        due_at=as_utc(cmd.due_at),
    )
    session.add(review)
    tenancy.register_owner(get_engine("auth"), cmd.case_id, cmd.partner_id, cmd.patient.mrn)
    # The offered specialist may see the case once the offer stands: a match whose transaction rolls back
    # (and may offer someone else when applied again) must not leave them able to read its records.
    access.note_change(session, cmd.case_id, review.reviewer_id)
    offered = ReviewOffered(
        case_id=cmd.case_id,
        review_id=review.id,
        reviewer_id=review.reviewer_id,
        subspecialty=review.subspecialty,
        explanation=review.match_explanation,
    )
    enqueue(session, EVENTS, event(f"{event_id}>{offered.TYPE}", offered))
    log.info("review.offered", case_id=cmd.case_id, review_id=review.id, reviewer_id=review.reviewer_id)


def submit(review: Review, findings: ReviewFindings, session: Session) -> None:
    """Record the specialist's second opinion, and the signature block it is signed with (the directory's
    entry may change later; the signed report must not); the caller has checked the review is accepted."""
    for name, value in findings.model_dump(mode="json").items():
        setattr(review, name, value)
    reviewer = session.get(Specialist, review.reviewer_id)
    if reviewer is not None:
        review.signed_name = reviewer.display_name
        review.signed_credentials = reviewer.credentials
        review.signed_npi = reviewer.npi or None
    review.status = "submitted"
    review.draft = None
    review.submitted_at = utcnow()
    session.add(review)
    submitted = ReviewSubmitted(
        case_id=review.case_id,
        review_id=review.id,
        reviewer_id=review.reviewer_id,
        agreement=findings.agreement,
        critical=findings.critical_result,
        communicated=findings.communication is not None,
    )
    enqueue(session, EVENTS, event(f"{submitted.TYPE}:{review.id}", submitted))
    log.info("review.submitted", case_id=review.case_id, review_id=review.id, agreement=findings.agreement)


def compose(cmd: ComposeReport, session: Session, settings: Settings) -> Report:
    """Build the integrated report (PDF and FHIR DiagnosticReport) once per case."""
    report = session.exec(select(Report).where(Report.case_id == cmd.case_id)).first()
    if report is not None:
        log.info("report.already_composed", case_id=cmd.case_id, report_id=report.id)
    else:
        report = _new_report(cmd, session, settings)
        session.add(report)
        log.info("report.composed", case_id=cmd.case_id, report_id=report.id, review_id=report.review_id)
    ready = ReportReady(
        case_id=cmd.case_id,
        report_id=report.id,
        pdf_url=report_pdf_url(settings, cmd.case_id),
        fhir_url=f"{settings.review_url}/fhir/DiagnosticReport/{report.id}",
        sha256=report.pdf_sha256,
    )
    enqueue(session, EVENTS, event(f"{ready.TYPE}:{cmd.case_id}", ready))
    archived = encapsulated_report_event(session, settings, report)
    if archived is not None:
        enqueue(session, EVENTS, event(f"{archived.TYPE}:{cmd.case_id}:{report.version}", archived))
    return report


def encapsulated_report_event(
    session: Session, settings: Settings, report: Report
) -> EncapsulatedReport | None:
    """The report as a DICOM Encapsulated PDF in the original study, for records to store with the images."""
    review = session.get(Review, report.review_id)
    if review is None:
        return None
    dicom = encapsulated_pdf(
        pdf=report_pdf_file(settings, report).read_bytes(),
        request=MatchSpecialist.model_validate(review.request),
        report_id=report.id,
        version=report.version,
        issued=as_utc(report.updated_at or report.created_at),
    )
    sop_instance_uid = str(pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True).SOPInstanceUID)
    return EncapsulatedReport(
        case_id=report.case_id,
        report_id=report.id,
        version=report.version,
        sop_instance_uid=sop_instance_uid,
        dicom_base64=base64.b64encode(dicom).decode(),
    )


def report_pdf_url(settings: Settings, case_id: str) -> str:
    return f"{settings.review_url}/v1/reports/{case_id}/pdf"


def report_pdf_file(settings: Settings, report: Report) -> Path:
    return settings.service_dir("review") / report.pdf_path


def _new_report(cmd: ComposeReport, session: Session, settings: Settings) -> Report:
    review = session.get(Review, cmd.review_id)
    if review is None or review.case_id != cmd.case_id:
        raise PoisonMessage(
            f"review {cmd.review_id} does not exist for case {cmd.case_id}; nothing to compose"
        )
    if review.status != "submitted" or review.submitted_at is None:
        raise PoisonMessage(f"review {cmd.review_id} is {review.status}, not submitted; nothing to compose")
    report = Report(
        id=str(uuid.uuid4()),
        case_id=cmd.case_id,
        review_id=review.id,
        pdf_sha256="",
        pdf_path="",
        diagnostic_report={},
        own_addenda_delivered=cmd.own_addenda_delivered,
        communication=cmd.communication.model_dump(mode="json") if cmd.communication else None,
    )
    report.partner_id, report.order_value, report.order_system = order_of(review)
    render_report(report, review, session, settings)
    return report


def order_of(review: Review) -> tuple[str | None, str | None, str | None]:
    """The case's partner, its order's value and system ("" sent without one), as the match said: what the FHIR
    search of DiagnosticReport reads."""
    request = review.request or {}
    value = request.get("partner_case_ref")
    return request.get("partner_id"), value, (request.get("partner_case_ref_system") or "") if value else None


def render_report(report: Report, review: Review, session: Session, settings: Settings) -> None:
    """(Re)write the report's PDF and DiagnosticReport from the review and its addenda (answered follow-up
    questions and the specialist's own), in the order they were signed."""
    findings = ReviewFindings.of(review)
    reviewer = session.get(Specialist, review.reviewer_id)
    if findings is None or review.submitted_at is None or reviewer is None:
        raise PoisonMessage(f"review {review.id} is not a submitted review by a known reviewer")
    content = ReportContent(
        case_id=report.case_id,
        request=MatchSpecialist.model_validate(review.request),
        findings=findings,
        reviewer=reviewer,
        subspecialty=review.subspecialty,
        signed_at=review.submitted_at,
        signature=signature_of(review),
        addenda=_addenda(review, session),
        communication=DocumentedCommunication.model_validate(report.communication)
        if report.communication
        else None,
    )
    pdf = sign_report_pdf(render_report_pdf(content), report_signer(content), settings)
    report.pdf_sha256, report.pdf_path = _store_pdf(settings, pdf)
    issued = utcnow()
    report.diagnostic_report = build_diagnostic_report(
        report_id=report.id,
        content=content,
        pdf=pdf,
        pdf_url=report_pdf_url(settings, report.case_id),
        issued=issued,
    )
    if content.addenda:
        report.updated_at = issued
    else:
        report.created_at = issued
    session.add(report)


def report_signer(content: ReportContent) -> ReportSigner:
    """The PAdES signature's /Name, /Reason and /M: the reviewer, what this version issues, when they signed it."""
    if content.addenda:
        return ReportSigner(content.reviewer_signature, ADDENDUM_ISSUED, content.addenda[-1].signed_at)
    return ReportSigner(content.reviewer_signature, REPORT_ISSUED, content.signed_at)


def reissue(report: Report, review: Review, session: Session, settings: Settings) -> None:
    """A new version of the report with the addendum just recorded (flushed): PDF, DiagnosticReport, and the
    DICOM Encapsulated PDF for records to store beside the first. The caller holds the report row locked."""
    session.flush()
    report.version += 1
    render_report(report, review, session, settings)
    archived = encapsulated_report_event(session, settings, report)
    if archived is not None:
        enqueue(session, EVENTS, event(f"{archived.TYPE}:{report.case_id}:{report.version}", archived))


def _addenda(review: Review, session: Session) -> tuple[Addendum, ...]:
    answered = session.exec(
        select(FollowUpQuestion).where(
            FollowUpQuestion.review_id == review.id, FollowUpQuestion.status == "answered"
        )
    ).all()
    own = session.exec(select(ReviewAddendum).where(ReviewAddendum.review_id == review.id)).all()
    addenda = [
        Addendum(q.answer or "", as_utc(q.answered_at or utcnow()), question=q.text) for q in answered
    ] + [Addendum(a.text, as_utc(a.signed_at), kind=a.kind) for a in own]
    return tuple(sorted(addenda, key=lambda a: a.signed_at))


def signature_of(review: Review) -> Signature | None:
    """The signature block copied at submission (None before copies were kept: the directory's entry)."""
    if review.signed_name is None or review.signed_credentials is None:
        return None
    return Signature(review.signed_name, review.signed_credentials, review.signed_npi)


def _store_pdf(settings: Settings, pdf: bytes) -> tuple[str, str]:
    """Write the PDF content-addressed (temp file + rename, so a reader never sees half a file)."""
    sha256 = hashlib.sha256(pdf).hexdigest()
    relative = f"reports/{sha256}.pdf"
    target = settings.service_dir("review") / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
            tmp.write(pdf)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, target)
    return sha256, relative


def event(event_id: str, data: Event) -> CloudEvent:
    return new_event(id=event_id, source=SOURCE, data=data, subject=data.case_id)
