"""The case API (`/v1/cases`): every route needs an API key and sees only the caller's own cases."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text, tuple_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client

from contracts.decisions import CancelCase, ConsentReceived, FollowUpQuestion
from contracts.models import CaseStatus, Urgency, UtcDatetime, as_utc
from services.auth import AuthEngine, Principal, Role, require_role
from services.auth.deps import audit_caller
from services.auth.problems import AUTH_ERRORS, Problem, problem_response
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.errors import IntakeRejected
from services.common.http import unstorable
from services.common.temporal import connect_temporal
from services.intake import decisions, handlers, idempotency
from services.intake.models import (
    CancelRequest,
    Case,
    CaseCreate,
    CaseDocument,
    CasePage,
    CasePublic,
    CaseQuestion,
    CaseTimelineEntry,
    DocumentCreate,
    DocumentKind,
    DocumentPublic,
    QuestionCreate,
    QuestionPublic,
    ReportLinks,
    TimelineEntry,
)

log = structlog.get_logger(__name__)
# How long a stored case is left to its own POST to start its workflow before the reconciler does.
START_GRACE = timedelta(seconds=10)

router = APIRouter(prefix="/v1/cases", tags=["cases"])


_problem = problem_response

ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: _problem(404, "No case with this id visible to the caller", "no case 3f…; check the case_id"),
    422: {
        "description": "The request is invalid; `errors` names each field (values are never echoed)",
        "model": Problem,
        "content": {
            "application/json": {
                "example": {
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "The request does not match the schema; fix the fields listed.",
                    "errors": [{"field": "patient.birth_date", "message": "Field required"}],
                }
            }
        },
    },
}
POST_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: _problem(409, "The case's state does not allow this", "the case is closed; nothing was changed"),
    413: _problem(413, "A document is larger than 10 MB", "a document is at most 10 MB; nothing was stored"),
    503: _problem(503, "The workflow service is unreachable; retry", "retry in a minute"),
}
CLOSED = {CaseStatus.CLOSED.value, CaseStatus.CANCELLED.value}
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024


# No I/O in these two: `async def` keeps them out of the thread pool (see services/auth/deps.py).
async def intake_engine() -> Engine:
    return get_engine("intake")


async def settings_dep() -> Settings:
    return get_settings()


def get_session(engine: Annotated[Engine, Depends(intake_engine)]) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


async def temporal_client(request: Request) -> Client | None:
    """The app's Temporal client, connected on first use; None while Temporal is unreachable."""
    client: Client | None = getattr(request.app.state, "temporal", None)
    if client is None:
        try:
            client = await connect_temporal(get_settings())
        except Exception as exc:
            log.warning("temporal.unreachable", error=type(exc).__name__)
            return None
        request.app.state.temporal = client
    return client


EngineDep = Annotated[Engine, Depends(intake_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
TemporalDep = Annotated[Client | None, Depends(temporal_client)]
SettingsDep = Annotated[Settings, Depends(settings_dep)]
CaseCaller = Annotated[Principal, Depends(require_role(Role.PARTNER, Role.OPERATIONS))]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="repeat a POST safely: the same key and body return the first answer",
    ),
]


class Audit:
    """Writes one audit entry per PHI read or write of the current request."""

    def __init__(self, request: Request, caller: CaseCaller, engine: AuthEngine) -> None:
        self.request = request
        self.caller = caller
        self.engine = engine

    def __call__(
        self, action: str, resource: str, case_id: str | None, outcome: str, detail: str = ""
    ) -> None:
        audit_caller(
            self.request,
            self.engine,
            self.caller,
            action=action,
            resource=resource,
            case_id=case_id,
            outcome=outcome,
            detail=detail,
        )


async def audit_dep(request: Request, caller: CaseCaller, engine: AuthEngine) -> Audit:
    return Audit(request, caller, engine)


AuditDep = Annotated[Audit, Depends(audit_dep)]


class AuditLog(Protocol):
    """What writes a request's audit entries: the API's `Audit`, or another entry point's (hl7_in)."""

    def __call__(
        self, action: str, resource: str, case_id: str | None, outcome: str, detail: str = ""
    ) -> None: ...


def to_public(case: Case, timeline: list[CaseTimelineEntry]) -> CasePublic:
    report = None
    if case.delivered_at and case.report_pdf_url and case.report_fhir_url:
        report = ReportLinks(
            pdf_url=case.report_pdf_url, fhir_url=case.report_fhir_url, delivered_at=case.delivered_at
        )
    return CasePublic(
        case_id=case.id,
        partner_id=case.partner_id,
        partner_case_ref=case.partner_case_ref,
        partner_case_ref_system=handlers.reference_system(case),
        status=case.status,
        urgency=Urgency(case.urgency),
        subspecialty=case.subspecialty,
        due_at=case.due_at,
        created_at=case.created_at,
        updated_at=case.updated_at,
        workflow_id=handlers.workflow_id(case.id),
        consent_on_file=case.consent_on_file,
        report=report,
        timeline=[TimelineEntry(status=t.status, detail=t.detail, at=t.at, kind=t.kind) for t in timeline],
    )


def visible_case(session: Session, case_id: str, caller: Principal, audit: Audit, action: str) -> Case:
    """The case if the caller may see it; otherwise 404 (another partner's case is not even confirmed)."""
    case = session.get(Case, case_id)
    if case is None or not caller.sees(case.partner_id):
        if case is not None:
            audit(action, "case", case_id, "denied", "another partner's case")
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "no case with this id for your key; check the case_id returned at creation",
        )
    return case


def load_public(session: Session, case: Case) -> CasePublic:
    timeline = session.exec(
        select(CaseTimelineEntry)
        .where(CaseTimelineEntry.case_id == case.id)
        .order_by(col(CaseTimelineEntry.at))
    ).all()
    return to_public(case, list(timeline))


async def idempotent(
    request: Request,
    caller: Principal,
    engine: Engine,
    key: str | None,
    status_code: int,
    run: Callable[[], Awaitable[BaseModel | dict[str, Any]]],
    media_type: str = "application/json",
    answered: Callable[[], int] | None = None,
) -> JSONResponse:
    """Run `run` once per (caller, Idempotency-Key); replays get the first answer. `answered`, when given, says
    the status once `run` has run (`status_code` otherwise)."""
    if key is None:
        body = _jsonable(await run())
        return JSONResponse(body, status_code=answered() if answered else status_code, media_type=media_type)
    owner = caller.partner_id or caller.actor
    print_ = idempotency.fingerprint(request.method, request.url.path, await request.body())
    try:
        stored = await run_in_threadpool(idempotency.claim, engine, owner, key, print_)
    except idempotency.KeyReusedWithOtherBody as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "this Idempotency-Key was already used with a different request; use a new key for a new request",
        ) from exc
    except idempotency.StillRunning as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "the first request with this Idempotency-Key is still running; retry"
        ) from exc
    if stored is not None:
        return JSONResponse(
            stored.body,
            status_code=stored.status_code,
            headers={"Idempotent-Replayed": "true"},
            media_type=media_type,
        )
    try:
        body = _jsonable(await run())
    except BaseException:
        await run_in_threadpool(idempotency.release, engine, owner, key)
        raise
    status_code = answered() if answered else status_code
    await run_in_threadpool(idempotency.complete, engine, owner, key, status_code, body)
    return JSONResponse(body, status_code=status_code, media_type=media_type)


def _jsonable(answer: BaseModel | dict[str, Any]) -> Any:
    return answer.model_dump(mode="json") if isinstance(answer, BaseModel) else answer


def same_patient(existing: Case, body: CaseCreate) -> None:
    """A reference names one patient's request: the same reference for another patient is refused (409),
    never answered with the first patient's case."""
    if CaseCreate.model_validate_json(existing.request_json).patient != body.patient:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "partner_case_ref already names a case for another patient; nothing was stored. "
            "Send a new reference for a new request.",
        )


def partner_for(body: CaseCreate, caller: Principal) -> str:
    if caller.role == Role.PARTNER:
        if body.partner_id is not None and body.partner_id != caller.partner_id:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "partner_id names another partner; omit it (your key decides the partner) or send your own",
            )
        return str(caller.partner_id)
    if body.partner_id is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "an operations key creates cases on behalf of a partner: send partner_id",
        )
    return body.partner_id


@router.post("", status_code=status.HTTP_201_CREATED, response_model=CasePublic, responses=POST_ERRORS)
async def create_case(
    body: CaseCreate,
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Create a case and start its workflow. The case is stored first: if Temporal is unreachable the
    workflow is started by the reconciler within seconds, so an accepted case is never lost. A repeated
    `partner_case_ref` (with the same `partner_case_ref_system`, or again without one) returns the existing
    case."""

    async def create() -> CasePublic:
        case, created = await open_case(body, [], caller, audit, engine, temporal, settings)
        if created is not None:  # a new case: the answer is what was just stored, no need to read it back
            return to_public(case, created)
        with Session(engine) as session:
            return load_public(session, case)

    return await idempotent(request, caller, engine, idempotency_key, 201, create)


def implausible_dates(body: CaseCreate) -> list[str]:
    """Dates no real request carries, each named (never its value): a birth or an exam after today (a day's
    grace: the partner's day may be ahead of UTC's), or an exam before the patient was born."""
    latest = datetime.now(UTC).date() + timedelta(days=1)
    problems = []
    if body.patient.birth_date > latest:
        problems.append("patient.birth_date (FHIR: Patient.birthDate) is in the future")
    if body.exam.performed_on > latest:
        problems.append("exam.performed_on (FHIR: ImagingStudy.started) is in the future")
    if body.patient.birth_date > body.exam.performed_on:
        problems.append("exam.performed_on is before patient.birth_date (the patient's date of birth)")
    return problems


async def open_case(
    body: CaseCreate,
    documents: list[DocumentCreate],
    caller: Principal,
    audit: AuditLog,
    engine: Engine,
    temporal: Client | None,
    settings: Settings,
) -> tuple[Case, list[CaseTimelineEntry] | None]:
    """Store the case with its documents in one transaction, then start its workflow. Also returns the
    timeline stored with a new case (None when the partner reference named an existing one)."""
    partner_id = partner_for(body, caller)
    if any(c == "\\" or ord(c) < 0x20 for c in body.patient.mrn):
        # The MRN becomes the DICOM Patient ID (LO) of the report filed with the study: a backslash there
        # splits it into two values. Refused before anything is stored; the value is not echoed.
        raise IntakeRejected(
            "patient.mrn (FHIR: Patient.identifier[0].value) contains a backslash or a control character, "
            "which a DICOM Patient ID cannot carry; send the MRN as your PACS stores it."
        )
    if problems := implausible_dates(body):
        raise IntakeRejected("; ".join(problems) + "; fix the dates and send the request again.")
    contents = [decode_content(d) for d in documents]

    created: list[CaseTimelineEntry] | None = None

    def store() -> Case:
        nonlocal created
        with Session(engine, expire_on_commit=False) as session:
            # An order stored before its system was kept is found by its value alone (the constraint below
            # cannot see it); only partners that have such orders pay for the look-up.
            legacy = handlers.legacy_case(body.partner_case_ref, partner_id, session)
            if legacy is not None:
                same_patient(legacy, body)
                log.info("case.repeated_reference", case_id=legacy.id)
                return legacy
            # A new reference is the common case: insert at once (no lookup first), and let the unique
            # constraint on (partner, reference, system) find a repeat, sent before or concurrently.
            case = handlers.new_case(body, partner_id, session)
            for document, content in zip(documents, contents, strict=True):
                session.add(document_row(case.id, document, content, caller))
            created = [row for row in session.new if isinstance(row, CaseTimelineEntry)]
            try:
                session.commit()
                return case
            except IntegrityError:
                session.rollback()
                created = None
                existing = handlers.existing_case(
                    body.partner_case_ref, body.partner_case_ref_system, partner_id, session
                )
                if existing is None:
                    raise  # not the reference's constraint
                same_patient(existing, body)
                log.info("case.repeated_reference", case_id=existing.id)
                return existing

    case = await run_in_threadpool(store)

    async def start() -> None:
        if case.workflow_started or temporal is None:
            return
        try:
            await handlers.start_workflow(temporal, case, settings)
        except Exception as exc:
            log.warning("workflow.start_deferred", case_id=case.id, error=type(exc).__name__)
            return
        case.workflow_started = True
        started_flags(engine).add(case.id)

    # The case is stored: its audit entry and its workflow's start no longer depend on each other, and each
    # waits on its own server (the audit chain's group commit, Temporal's persistence), so side by side.
    audited, _ = await asyncio.gather(
        run_in_threadpool(audit, "create", "case", case.id, "success"), start(), return_exceptions=True
    )
    if isinstance(audited, BaseException):
        raise audited
    return case, sorted(created, key=lambda row: row.at) if created is not None else None


@router.get("/{case_id}", response_model=CasePublic, responses=ERRORS)
def get_case(case_id: str, session: SessionDep, caller: CaseCaller, audit: AuditDep) -> CasePublic:
    """The case's status and its timeline of status changes."""
    case = visible_case(session, case_id, caller, audit, "read")
    audit("read", "case", case_id, "success")
    return load_public(session, case)


def encode_cursor(case: Case) -> str:
    raw = json.dumps({"c": case.created_at.isoformat(), "i": case.id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        created, case_id = as_utc(datetime.fromisoformat(raw["c"])), raw["i"]
        if not isinstance(case_id, str) or unstorable(case_id):  # a NUL or a lone surrogate fails the query
            raise ValueError("not a case id")
        return created, case_id
    except (ValueError, KeyError, TypeError) as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "cursor is not one this API returned; pass next_cursor from the previous page unchanged",
        ) from exc


@router.get("", response_model=CasePage, responses=ERRORS)
def list_cases(
    session: SessionDep,
    caller: CaseCaller,
    audit: AuditDep,
    status_filter: Annotated[str | None, Query(alias="status", pattern=r"^[a-z_]{1,40}$")] = None,
    urgency: Urgency | None = None,
    partner_id: Annotated[str | None, Query(max_length=64)] = None,
    created_from: Annotated[
        UtcDatetime | None, Query(description="inclusive, ISO 8601 (UTC if no offset)")
    ] = None,
    created_to: Annotated[
        UtcDatetime | None, Query(description="exclusive, ISO 8601 (UTC if no offset)")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> CasePage:
    """The caller's cases, newest first, filtered; a partner key never sees another partner's cases."""
    query = select(Case).order_by(col(Case.created_at).desc(), col(Case.id).desc()).limit(limit + 1)
    if caller.role == Role.PARTNER:
        query = query.where(Case.partner_id == caller.partner_id)
    if partner_id is not None:
        query = query.where(Case.partner_id == partner_id)
    if status_filter is not None:
        query = query.where(Case.status == status_filter)
    if urgency is not None:
        query = query.where(Case.urgency == urgency.value)
    if created_from is not None:
        query = query.where(col(Case.created_at) >= created_from)
    if created_to is not None:
        query = query.where(col(Case.created_at) < created_to)
    if cursor is not None:
        query = query.where(tuple_(col(Case.created_at), col(Case.id)) < tuple_(*decode_cursor(cursor)))
    rows = list(session.exec(query).all())
    page, more = rows[:limit], len(rows) > limit
    audit("list", "case", None, "success", f"{len(page)} cases")
    return CasePage(
        items=[to_public(case, []) for case in page], next_cursor=encode_cursor(page[-1]) if more else None
    )


@router.post("/{case_id}/cancel", response_model=CasePublic, responses=POST_ERRORS)
async def cancel_case(
    case_id: str,
    body: CancelRequest,
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Cancel the case: the workflow stops and every service withdraws its work. 409 with the workflow's
    reason when it refuses (e.g. the report was already delivered)."""

    def read_case() -> Case:
        with Session(engine) as session:
            return visible_case(session, case_id, caller, audit, "update")

    def read_public() -> CasePublic:
        with Session(engine) as session:
            return load_public(session, session.get(Case, case_id))  # type: ignore[arg-type]

    async def cancel() -> CasePublic:
        # The database is read off the event loop: the other requests go on meanwhile.
        case = await run_in_threadpool(read_case)
        if case.status in CLOSED:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"the case is already {case.status}; nothing to cancel"
            )
        try:
            await decisions.cancel(temporal, case_id, CancelCase(by=caller.actor, reason=body.reason))
        except decisions.WorkflowRejected as exc:
            await run_in_threadpool(audit, "update", "case.cancel", case_id, "failed", "rejected by workflow")
            raise HTTPException(status.HTTP_409_CONFLICT, f"the case cannot be cancelled: {exc}") from exc
        except decisions.WorkflowUnreachable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        await run_in_threadpool(audit, "update", "case.cancel", case_id, "success")
        return await run_in_threadpool(read_public)

    return await idempotent(request, caller, engine, idempotency_key, 200, cancel)


@router.post("/{case_id}/documents", status_code=201, response_model=DocumentPublic, responses=POST_ERRORS)
async def add_document(
    case_id: str,
    body: DocumentCreate,
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Add a document to an open case. A `records_release_authorization` puts consent on file: a case
    waiting in `awaiting_consent` goes on to records retrieval."""
    content = decode_content(body)

    async def add() -> DocumentPublic:
        document = await run_in_threadpool(store_document, engine, case_id, body, content, caller, audit)
        if document.kind == DocumentKind.RECORDS_RELEASE_AUTHORIZATION:
            await signal_consent(engine, temporal, document)
        return document

    return await idempotent(request, caller, engine, idempotency_key, 201, add)


def decode_content(document: DocumentCreate) -> bytes:
    try:
        content = base64.b64decode(document.content_base64, validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII string
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "content_base64 is not valid base64; nothing was stored"
        ) from exc
    if len(content) > MAX_DOCUMENT_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, "a document is at most 10 MB; nothing was stored"
        )
    return content


def document_row(case_id: str, body: DocumentCreate, content: bytes, caller: Principal) -> CaseDocument:
    return CaseDocument(
        id=str(uuid.uuid4()),
        case_id=case_id,
        kind=body.kind.value,
        title=body.title,
        content_type=body.content_type,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        content=content,
        added_by=caller.actor,
    )


def store_document(
    engine: Engine, case_id: str, body: DocumentCreate, content: bytes, caller: Principal, audit: Audit
) -> DocumentPublic:
    consent = body.kind == DocumentKind.RECORDS_RELEASE_AUTHORIZATION
    with Session(engine, expire_on_commit=False) as session:
        case = visible_case(session, case_id, caller, audit, "create")
        # Read again, locked: a cancellation being applied is waited for, never missed. Shared, as documents
        # do not conflict; a consent writes the case, so it locks as its UPDATE would (no deadlock of two).
        session.refresh(case, with_for_update={"key_share": True} if consent else {"read": True})
        if case.status in CLOSED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"the case is {case.status}; documents are closed")
        document = document_row(case_id, body, content, caller)
        session.add(document)
        if consent:
            # A workflow not started yet starts with consent on file.
            case.consent_on_file = True
            session.add(case)
        session.commit()
    audit("create", "case.document", case_id, "success", body.kind.value)
    return DocumentPublic(
        document_id=document.id,
        case_id=case_id,
        kind=DocumentKind(document.kind),
        title=document.title,
        content_type=document.content_type,
        sha256=document.sha256,
        size=document.size,
        created_at=document.created_at,
    )


async def signal_consent(engine: Engine, temporal: Client | None, document: DocumentPublic) -> None:
    """Tell the workflow; when it cannot be told now, the reconciler signals it later.

    Tried even when the case is not flagged started: the flag is set just after the POST that started the
    workflow has answered, so a document sent at once may find it unset. A workflow not started yet
    answers NOT_FOUND (then the reconciler starts it with consent on file, and signals it too)."""
    try:
        await decisions.consent_received(
            temporal, document.case_id, ConsentReceived(by="intake", document_id=document.document_id)
        )
    except decisions.WorkflowUnreachable as exc:
        log.warning("consent.signal_deferred", case_id=document.case_id, error=str(exc))
        return
    await run_in_threadpool(mark_consent_signalled, engine, document.document_id)


def mark_consent_signalled(engine: Engine, document_id: str) -> None:
    with Session(engine) as session:
        document = session.get(CaseDocument, document_id)
        if document is not None and document.consent_signalled_at is None:
            document.consent_signalled_at = datetime.now(UTC)
            session.add(document)
            session.commit()


def unsignalled_consents(engine: Engine, limit: int = 100) -> list[DocumentPublic]:
    with Session(engine) as session:
        rows = session.exec(
            select(CaseDocument)
            .join(Case, col(Case.id) == col(CaseDocument.case_id))
            .where(
                CaseDocument.kind == DocumentKind.RECORDS_RELEASE_AUTHORIZATION.value,
                col(CaseDocument.consent_signalled_at).is_(None),
                col(Case.workflow_started).is_(True),
            )
            .limit(limit)
        ).all()
        return [
            DocumentPublic(
                document_id=d.id,
                case_id=d.case_id,
                kind=DocumentKind(d.kind),
                title=d.title,
                content_type=d.content_type,
                sha256=d.sha256,
                size=d.size,
                created_at=d.created_at,
            )
            for d in rows
        ]


@router.post("/{case_id}/questions", status_code=201, response_model=QuestionPublic, responses=POST_ERRORS)
async def ask_question(
    case_id: str,
    body: QuestionCreate,
    request: Request,
    caller: CaseCaller,
    audit: AuditDep,
    engine: EngineDep,
    temporal: TemporalDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """A follow-up question for the reviewing specialist, after the report was delivered (at most three)."""

    def read_case() -> Case:
        with Session(engine) as session:
            return visible_case(session, case_id, caller, audit, "create")

    def store_question(question: CaseQuestion) -> None:
        with Session(engine) as session:
            session.add(question)
            session.commit()

    async def ask() -> QuestionPublic:
        # The database is read and written off the event loop: the other requests go on meanwhile.
        case = await run_in_threadpool(read_case)
        if case.delivered_at is None or case.status == CaseStatus.CANCELLED:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"questions are taken after the report is delivered; the case is {case.status}",
            )
        question_id = str(uuid.uuid4())
        try:
            await decisions.ask_question(
                temporal, case_id, FollowUpQuestion(by=caller.actor, question_id=question_id, text=body.text)
            )
        except decisions.WorkflowRejected as exc:
            await run_in_threadpool(
                audit, "create", "case.question", case_id, "failed", "rejected by workflow"
            )
            raise HTTPException(status.HTTP_409_CONFLICT, f"the question was not accepted: {exc}") from exc
        except decisions.WorkflowUnreachable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        now = datetime.now(UTC)
        question = CaseQuestion(
            id=question_id, case_id=case_id, text=body.text, asked_by=caller.actor, created_at=now
        )
        await run_in_threadpool(store_question, question)
        await run_in_threadpool(audit, "create", "case.question", case_id, "success")
        return QuestionPublic(question_id=question_id, case_id=case_id, created_at=now)

    return await idempotent(request, caller, engine, idempotency_key, 201, ask)


def mark_started(engine: Engine, case_ids: Collection[str]) -> None:
    # Two statements on a plain connection: no ORM session is needed for a flag.
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Not worth a WAL flush of its own: if a crash loses the flag, the reconciler starts the
            # workflow again, Temporal answers that it already runs, and the flag is set then.
            conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
        conn.execute(
            update(Case)
            .where(col(Case.id).in_(list(case_ids)), col(Case.workflow_started).is_(False))
            .values(workflow_started=True)
        )


class StartedFlags:
    """Sets `workflow_started` on the cases whose workflow this process started, off the request's path:
    the POST answers once Temporal has the workflow, and the flags of the cases started meanwhile are set
    together, in one UPDATE, by one thread at a time.

    The flag only tells the reconciler what it need not start. One that is never set (the process stopped
    first, the database refused) costs the reconciler a start that Temporal answers with "already
    started", after which the reconciler sets it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)  # not kept alive by this: a test's engine goes with its test
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._writing = False

    def add(self, case_id: str) -> None:
        with self._lock:
            self._pending.append(case_id)
            if self._writing:
                return  # the thread writing now takes it in its next UPDATE
            self._writing = True
        threading.Thread(target=self._write, name="started-flags", daemon=True).start()

    def _write(self) -> None:
        while True:
            with self._lock:
                case_ids, self._pending = self._pending, []
                if not case_ids:
                    self._writing = False
                    return
            engine = self._engine()
            if engine is None:
                continue  # the engine was disposed of: nothing left to write to
            try:
                mark_started(engine, case_ids)
            except Exception as exc:
                log.warning("workflow.started_flags_unset", cases=len(case_ids), error=type(exc).__name__)


_started_flags: weakref.WeakKeyDictionary[Engine, StartedFlags] = weakref.WeakKeyDictionary()
_started_flags_lock = threading.Lock()


def started_flags(engine: Engine) -> StartedFlags:
    with _started_flags_lock:
        flags = _started_flags.get(engine)
        if flags is None:
            flags = _started_flags[engine] = StartedFlags(engine)
        return flags


def unstarted_cases(engine: Engine, limit: int = 100, settled_for: timedelta = START_GRACE) -> list[Case]:
    """Stored cases whose workflow was not started, created at least `settled_for` ago: a younger one may
    still be starting in its own POST (under load a start can take a second or more), and starting it from
    here too would cost Temporal a second start that it only refuses."""
    with Session(engine, expire_on_commit=False) as session:
        return list(
            session.exec(
                select(Case)
                .where(
                    col(Case.workflow_started).is_(False),
                    col(Case.created_at) <= datetime.now(UTC) - settled_for,
                )
                .order_by(col(Case.created_at))
                .limit(limit)
            ).all()
        )
