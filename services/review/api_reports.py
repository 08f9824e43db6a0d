"""HTTP API of the integrated report: PDF, FHIR DiagnosticReport or DICOM Encapsulated PDF by content
negotiation, and the patient's plain-language summary. The DICOM is the records service's copy, placed into
the study it reads (records_copy.py)."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import false, func
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from services.auth import Principal, Role, authenticate
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.fhir import FhirJsonResponse, etag, fhir_resource_answer, unchanged
from services.common.fhir_params import CASE_SYSTEM, REPORT_PARAMS
from services.common.fhir_search import (
    Search,
    SearchRefused,
    Token,
    all_of,
    date_condition,
    newest_first_page,
    read_search,
    searchset,
    sent_parameters,
)
from services.common.http import fhir_json_only
from services.review import handlers
from services.review.deps import Access, AccessDep, SessionDep, SettingsDep
from services.review.diagnostic_report import FHIR_JSON, operation_outcome
from services.review.encapsulated_pdf import DICOM, report_instance_uid
from services.review.models import (
    FollowUpQuestion,
    Report,
    Review,
    ReviewAddendum,
    ReviewFindings,
    Specialist,
)
from services.review.patient_summary import PatientSummary, patient_summary
from services.review.records_copy import RecordsClient, RecordsCopyUnavailable, fetch_records_copy

PDF = "application/pdf"
PARTNER_SYSTEM = "urn:secondopinion:partner:"
ReportFormat = Literal["pdf", "fhir", "dicom"]
REPORT_MEDIA_TYPES: dict[str, ReportFormat] = {
    PDF: "pdf",
    FHIR_JSON: "fhir",
    "application/json": "fhir",
    DICOM: "dicom",
}

# A report is read by the case's partner, the specialist who wrote it, and operations (404 for others).
_AUTH = {"dependencies": [Depends(authenticate)], "responses": AUTH_ERRORS, "route_class": AuthRoute}
reports = APIRouter(prefix="/v1/reports", tags=["reports"], **_AUTH)  # type: ignore[arg-type]
fhir = APIRouter(
    prefix="/fhir/DiagnosticReport",
    tags=["fhir"],
    dependencies=[Depends(authenticate), Depends(fhir_json_only)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)


BINARY = {"schema": {"type": "string", "format": "binary"}}
DIAGNOSTIC_REPORT = fhir_resource_answer("DiagnosticReport", "")[200]["content"][FHIR_JSON]


@reports.get(
    "/{case_id}",
    response_class=FhirJsonResponse,
    responses={
        200: {
            "content": {FHIR_JSON: DIAGNOSTIC_REPORT, PDF: BINARY, DICOM: BINARY},
            "description": "the report in the format asked",
        },
        404: {"description": "no report for the case yet"},
        406: {"description": "none of PDF, FHIR JSON or DICOM is acceptable"},
        409: {"description": "DICOM: records has not placed this report version into the study yet"},
        503: {"description": "DICOM: the records service, which holds the instance, did not answer"},
    },
)
def get_report(
    case_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    access: AccessDep,
    records: RecordsClient,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """The integrated report: `Accept: application/pdf` for the PDF, `application/dicom` for the DICOM
    Encapsulated PDF in the study it reads, otherwise the FHIR DiagnosticReport.

    The DICOM is the records service's copy of this version, with the identity of the study records placed
    it into (the one it sends the facility's PACS and hands out over DICOMweb), never another copy under the
    same SOP Instance UID: 409 with Retry-After until records has placed it (its images may wait for an
    identity decision), 503 with Retry-After while records does not answer."""
    report_format = negotiate_report_format(accept)
    if report_format is None:
        raise HTTPException(406, f"the report is available as {', '.join(REPORT_MEDIA_TYPES)}; ask for one")
    report = _report_or_404(session, case_id, access)
    headers = {"Vary": "Accept"}
    if report_format == "fhir":
        return JSONResponse(report.diagnostic_report, media_type=FHIR_JSON, headers=headers)
    if report_format == "pdf":
        headers["ETag"] = f'"{report.pdf_sha256}-pdf"'
        headers["Content-Disposition"] = f'inline; filename="second-opinion-{case_id}.pdf"'
        return Response(
            handlers.report_pdf_file(settings, report).read_bytes(), media_type=PDF, headers=headers
        )
    try:
        placed = fetch_records_copy(
            records,
            case_id=case_id,
            issued_uid=report_instance_uid(report.id, report.version),
            authorization=request.headers["Authorization"],  # authenticate has checked it is there
        )
    except RecordsCopyUnavailable as exc:
        raise HTTPException(exc.status_code, str(exc), headers={"Retry-After": exc.retry_after}) from None
    headers["Content-Disposition"] = f'attachment; filename="second-opinion-{case_id}.dcm"'
    if placed.location:
        headers["Content-Location"] = placed.location
    return Response(placed.dicom, media_type=DICOM, headers=headers)


@reports.get("/{case_id}/pdf", response_class=Response, responses={200: {"content": {PDF: BINARY}}, 404: {}})
def get_report_pdf(case_id: str, session: SessionDep, settings: SettingsDep, access: AccessDep) -> Response:
    """The PDF whatever the Accept header: DiagnosticReport.presentedForm.url points here."""
    report = _report_or_404(session, case_id, access)
    headers = {
        "ETag": f'"{report.pdf_sha256}-pdf"',
        "Content-Disposition": f'inline; filename="second-opinion-{case_id}.pdf"',
    }
    return Response(handlers.report_pdf_file(settings, report).read_bytes(), media_type=PDF, headers=headers)


@reports.get("/{case_id}/patient-summary", response_model=PatientSummary, responses={404: {}})
def get_patient_summary(
    case_id: str, session: SessionDep, settings: SettingsDep, access: AccessDep
) -> PatientSummary:
    """The second opinion in plain language for the patient (without the quality-assurance score)."""
    report = _report_or_404(session, case_id, access)
    review = session.get(Review, report.review_id)
    findings = ReviewFindings.of(review) if review else None
    reviewer = session.get(Specialist, review.reviewer_id) if review else None
    if review is None or findings is None or reviewer is None or review.submitted_at is None:
        raise HTTPException(404, "the case has no submitted review")
    answered = session.exec(
        select(FollowUpQuestion)
        .where(FollowUpQuestion.review_id == review.id, FollowUpQuestion.status == "answered")
        .order_by(col(FollowUpQuestion.answered_at))
    ).all()
    own = session.exec(
        select(ReviewAddendum)
        .where(ReviewAddendum.review_id == review.id)
        .order_by(col(ReviewAddendum.signed_at))
    ).all()
    return patient_summary(
        case_id=case_id,
        exam_type=review.exam_type,
        reviewer=str(handlers.signature_of(review) or f"{reviewer.display_name}, {reviewer.credentials}"),
        signed_at=review.submitted_at,
        findings=findings,
        follow_ups=[(q.text, q.answer or "") for q in answered],
        addenda=[(a.kind, a.text) for a in own],
    )


@fhir.get(
    "/{report_id}",
    response_class=FhirJsonResponse,
    responses={
        200: {
            "content": {FHIR_JSON: DIAGNOSTIC_REPORT},
            "description": "the latest version of the report; `ETag` is its meta.versionId",
        },
        304: {"description": "If-None-Match names the latest version: unchanged since"},
        404: {"content": {FHIR_JSON: {}}},
    },
)
def read_diagnostic_report(
    report_id: str,
    session: SessionDep,
    access: AccessDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=300)] = None,
) -> Response:
    """The integrated report's latest version (each addendum makes one: `appended`, or `corrected`).
    `ETag` is `meta.versionId`; `If-None-Match` with it is answered 304 while no addendum was added."""
    report = session.get(Report, report_id)
    if report is not None and not access.sees_report(report.case_id, _reviewer_of(session, report)):
        access.deny("report", report.case_id, "not visible")
        report = None
    if report is None:
        outcome = operation_outcome("not-found", "no DiagnosticReport with this id visible to your key")
        return JSONResponse(outcome, status_code=404, media_type=FHIR_JSON)
    access.allow("report", report.case_id)
    resource = report.diagnostic_report
    meta = resource.get("meta", {})
    # A report composed before DiagnosticReports carried meta is versioned by its row.
    version = {"meta": {"versionId": meta.get("versionId", str(report.version))}}
    headers = {"ETag": etag(version)}
    if "lastUpdated" in meta:
        headers["Last-Modified"] = format_datetime(datetime.fromisoformat(meta["lastUpdated"]), usegmt=True)
    if unchanged(if_none_match, version):
        return Response(status_code=304, headers=headers)
    return JSONResponse(resource, media_type=FHIR_JSON, headers=headers)


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


def _reviewer_of(session: Session, report: Report) -> str | None:
    review = session.get(Review, report.review_id)
    return review.reviewer_id if review else None


def _report_or_404(session: Session, case_id: str, access: Access) -> Report:
    missing = "the case has no report visible to your key yet; it is composed after the review is submitted"
    report = session.exec(select(Report).where(Report.case_id == case_id)).first()
    if report is not None and not access.sees_report(case_id, _reviewer_of(session, report)):
        raise access.deny("report", case_id, missing)
    if report is None:
        raise HTTPException(404, missing)
    access.allow("report", case_id)
    return report


# The FHIR search of DiagnosticReport (services.common.fhir_search): a partner finds the report of its order.
def _order_named(token: Token) -> ColumnElement[bool]:
    """The reports whose order (basedOn.identifier) the token names; one sent without a system is named under
    the partner's namespace (diagnostic_report.based_on), so that system names it too."""
    same_value = col(Report.order_value) == token.code
    if token.system is None:
        return same_value
    if token.system == "":
        return same_value & (col(Report.order_system) == "")
    named = same_value & (col(Report.order_system) == token.system)
    if token.system.startswith(PARTNER_SYSTEM):
        partner = token.system[len(PARTNER_SYSTEM) :]
        return named | (same_value & (col(Report.order_system) == "") & (col(Report.partner_id) == partner))
    return named


def _report_conditions(search: Search) -> list[ColumnElement[bool]]:
    last_updated = func.coalesce(col(Report.updated_at), col(Report.created_at))
    return [
        *all_of(search, "_id", lambda t: col(Report.id) == t.code),
        *all_of(search, "identifier", lambda t: col(Report.case_id) == t.code if t.system in (None, CASE_SYSTEM)
                else false()),
        *all_of(search, "based-on", lambda i: col(Report.case_id) == i if i is not None else false()),
        *all_of(search, "based-on:identifier", _order_named),
        *all_of(search, "_lastUpdated", lambda d: date_condition(last_updated, d)),
    ]  # fmt: skip


def _report_scope(caller: Principal) -> list[ColumnElement[bool]]:
    """Operations every report; a partner its cases'; a specialist the reports of their own reviews."""
    if caller.role == Role.OPERATIONS:
        return []
    if caller.role == Role.SPECIALIST:
        theirs = select(Review.id).where(Review.reviewer_id == (caller.specialist_id or ""))
        return [col(Report.review_id).in_(theirs)]
    return [col(Report.partner_id) == (caller.partner_id or "")]


def _search_reports(
    session: Session, caller: Principal, search: Search
) -> tuple[int, list[Report], str | None]:
    return newest_first_page(session, Report, [*_report_scope(caller), *_report_conditions(search)], search)


SEARCH_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a `searchset` Bundle of the reports your key may read (`total` all matches; `link` self "
        "and next, absolute)",
        "content": {FHIR_JSON: {"example": {"resourceType": "Bundle", "type": "searchset", "total": 1}}},
    },
    400: {
        "description": "a value that cannot be read, or with `Prefer: handling=strict` an unknown parameter: an "
        "OperationOutcome naming the parameter",
        "content": {FHIR_JSON: {}},
    },
}


async def search_diagnostic_reports(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    access: AccessDep,
    prefer: Annotated[str | None, Header(alias="Prefer", max_length=200)] = None,
) -> Response:
    """The reports of your orders, newest first: by your order (`based-on=ServiceRequest/{id}`,
    `based-on:identifier=[system|]value`), the case (`identifier`) or the last change (`_lastUpdated`). Each
    report handed out is audited as a read."""
    try:
        search = read_search(await sent_parameters(request), REPORT_PARAMS, prefer)
        total, page, cursor = await run_in_threadpool(_search_reports, session, access.caller, search)
    except SearchRefused as refused:
        return refused.answer()
    for report in page:  # each entry committed before the answer goes: off the event loop, as the search is
        await run_in_threadpool(access.allow, "report", report.case_id)
    base = f"{settings.review_url.rstrip('/')}/fhir"
    bundle = searchset(base, "DiagnosticReport", search, total, [r.diagnostic_report for r in page], cursor)
    return JSONResponse(bundle, media_type=FHIR_JSON)


fhir.add_api_route(
    "",
    search_diagnostic_reports,
    methods=["GET"],
    responses=SEARCH_ANSWERS,
    openapi_extra={"parameters": [
        {"name": p.name, "in": "query", "required": False, "description": p.documentation,
         "schema": {"type": "string"}} for p in REPORT_PARAMS.values()
    ]},
)  # fmt: skip
fhir.add_api_route(
    "/_search",
    search_diagnostic_reports,
    methods=["POST"],
    responses=SEARCH_ANSWERS,
    openapi_extra={"requestBody": {"required": False, "content": {"application/x-www-form-urlencoded": {
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "example": {"based-on:identifier": "urn:oid:2.16.840.1.113883.19.5.1|REF-1001"}}}}},
)  # fmt: skip
