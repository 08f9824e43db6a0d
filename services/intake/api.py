"""The case API (`/v1/cases`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client

from contracts.models import CaseStatus
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.temporal import connect_temporal
from services.intake import handlers
from services.intake.models import Case, CaseCreate, CasePublic, CaseTimelineEntry, ReportLinks, TimelineEntry

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/cases", tags=["cases"])

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No case with this id"},
    422: {"description": "The request is invalid; `errors` names each field"},
}


def intake_engine() -> Engine:
    return get_engine("intake")


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
SettingsDep = Annotated[Settings, Depends(get_settings)]


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
        status=CaseStatus(case.status),
        urgency=case.urgency,  # type: ignore[arg-type]
        subspecialty=case.subspecialty,
        due_at=case.due_at,
        created_at=case.created_at,
        updated_at=case.updated_at,
        workflow_id=handlers.workflow_id(case.id),
        report=report,
        timeline=[TimelineEntry(status=t.status, detail=t.detail, at=t.at) for t in timeline],
    )


def _load(session: Session, case_id: str) -> CasePublic:
    case = session.get(Case, case_id)
    if case is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no case {case_id}; check the case_id returned at creation"
        )
    timeline = session.exec(
        select(CaseTimelineEntry)
        .where(CaseTimelineEntry.case_id == case_id)
        .order_by(col(CaseTimelineEntry.at))
    ).all()
    return to_public(case, list(timeline))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=CasePublic, responses=ERRORS)
async def create_case(
    body: CaseCreate, engine: EngineDep, temporal: TemporalDep, settings: SettingsDep
) -> CasePublic:
    """Create a case and start its workflow. The case is stored first: if Temporal is unreachable the
    workflow is started by the reconciler within seconds, so an accepted case is never lost."""

    def store() -> Case:
        with Session(engine, expire_on_commit=False) as session:
            case = handlers.create_case(body, session)
            try:
                session.commit()
            except IntegrityError:
                # The same partner reference was stored by a concurrent request: return that case.
                session.rollback()
                case = handlers.create_case(body, session)
            return case

    case = await run_in_threadpool(store)
    if not case.workflow_started and temporal is not None:
        try:
            await handlers.start_workflow(temporal, case, settings)
            await run_in_threadpool(mark_started, engine, case.id)
        except Exception as exc:
            log.warning("workflow.start_deferred", case_id=case.id, error=type(exc).__name__)

    def reload() -> CasePublic:
        with Session(engine) as session:
            return _load(session, case.id)

    return await run_in_threadpool(reload)


@router.get("/{case_id}", response_model=CasePublic, responses=ERRORS)
def get_case(case_id: str, session: SessionDep) -> CasePublic:
    """The case's status and its timeline of status changes."""
    return _load(session, case_id)


@router.get("", response_model=list[CasePublic])
def list_cases(
    session: SessionDep,
    status_filter: Annotated[CaseStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[CasePublic]:
    """The newest cases first, optionally only those in one status."""
    query = select(Case).order_by(col(Case.created_at).desc()).limit(limit)
    if status_filter is not None:
        query = query.where(Case.status == status_filter.value)
    return [to_public(case, []) for case in session.exec(query).all()]


def mark_started(engine: Engine, case_id: str) -> None:
    with Session(engine) as session:
        case = session.get(Case, case_id)
        if case is not None and not case.workflow_started:
            case.workflow_started = True
            session.add(case)
            session.commit()


def unstarted_cases(engine: Engine, limit: int = 100) -> list[Case]:
    with Session(engine, expire_on_commit=False) as session:
        return list(
            session.exec(
                select(Case)
                .where(col(Case.workflow_started).is_(False))
                .order_by(col(Case.created_at))
                .limit(limit)
            ).all()
        )
