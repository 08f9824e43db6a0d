"""/v1/coverage: plans, network status, each case's coverage decision, estimate, authorization, Coverage."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse
from sqlmodel import Session, select

from services.auth.access import case_scope
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.db import get_engine, utcnow
from services.common.fhir import FhirJsonResponse, fhir_resource_answer
from services.insurance import fhir_resources, handlers
from services.insurance.connectors import find_plan, network_status
from services.insurance.models import (
    AuthorizationCreate,
    CoverageVerification,
    CoverageVerificationPublic,
    EstimatePublic,
    InsurancePlan,
    NetworkStatusPublic,
    PlanPublic,
)
from services.insurance.settings import get_insurance_settings

# Every route needs a key; a case's coverage is its partner's and operations'.
router = APIRouter(
    prefix="/v1/coverage",
    tags=["coverage"],
    dependencies=[Depends(case_scope("coverage"))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)


def get_session() -> Iterator[Session]:
    with Session(get_engine("insurance"), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
NOT_VERIFIED: dict[int | str, dict[str, Any]] = {
    404: {"description": "coverage for the case has not been verified (yet)"}
}
FHIR_COVERAGE = fhir_resource_answer(
    "Coverage", "the case's coverage as a FHIR R4 Coverage (member id masked)"
)


@router.get("/plans", response_model=list[PlanPublic])
def list_plans(session: SessionDep, include_inactive: bool = False) -> list[InsurancePlan]:
    query = select(InsurancePlan).order_by(InsurancePlan.code)
    if not include_inactive:
        query = query.where(InsurancePlan.active)
    return list(session.exec(query).all())


@router.get("/network", response_model=NetworkStatusPublic)
def get_network_status(
    session: SessionDep,
    plan_code: Annotated[str, Query(min_length=1, max_length=50)],
    organization: Annotated[str, Query(min_length=1, max_length=200)],
) -> NetworkStatusPublic:
    """Whether `organization` is in the network of `plan_code` (the matching step asks this)."""
    plan = find_plan(session, plan_code)
    status, source = network_status(session, plan, organization)
    return NetworkStatusPublic(
        plan_code=plan.code if plan else plan_code, organization=organization, network=status, source=source
    )


@router.get("/{case_id}", response_model=CoverageVerificationPublic, responses=NOT_VERIFIED)
def get_verification(case_id: str, session: SessionDep) -> CoverageVerificationPublic:
    row = _verification(session, case_id)
    return CoverageVerificationPublic.model_validate(
        {**row.model_dump(), "withdrawn": row.cancelled_at is not None}
    )


@router.get("/{case_id}/estimate", response_model=EstimatePublic, responses=NOT_VERIFIED)
def get_estimate(case_id: str, session: SessionDep) -> EstimatePublic:
    """The out-of-pocket estimate to show the patient before the review starts."""
    row = _verification(session, case_id)
    max_age = timedelta(hours=get_insurance_settings().verification_max_age_hours)
    return EstimatePublic(
        case_id=row.case_id,
        cpt=row.cpt,
        coverage_status=row.coverage_status,  # type: ignore[arg-type]  # validated by pydantic
        plan_code=row.plan_code,
        network=row.network,
        allowed_amount=row.allowed_amount,
        deductible_remaining_before=row.deductible_remaining,
        deductible=row.deductible_applied,
        copay=row.copay,
        coinsurance_pct=row.coinsurance_pct,
        coinsurance=row.coinsurance_amount,
        patient_share=row.patient_cost,
        plan_pays=row.allowed_amount - row.patient_cost,
        authorization=row.authorization,
        explanation=row.explanation,
        verified_at=row.verified_at,
        stale=utcnow() - row.verified_at > max_age,
    )


@router.post(
    "/{case_id}/authorization",
    response_model=CoverageVerificationPublic,
    responses={**NOT_VERIFIED, 409: {"description": "the case needs no authorization, or was cancelled"}},
)
def record_authorization(
    case_id: str, body: AuthorizationCreate, session: SessionDep
) -> CoverageVerificationPublic:
    """Record the referral document or prior-authorization number; re-verifies and announces `satisfied`."""
    _verification(session, case_id)
    try:
        row = handlers.authorize(case_id, body, session)
    except handlers.AuthorizationRefused as exc:
        session.rollback()
        raise HTTPException(409, str(exc)) from exc
    session.commit()
    return CoverageVerificationPublic.model_validate({**row.model_dump(), "withdrawn": False})


@router.get(
    "/{case_id}/Coverage", response_class=FhirJsonResponse, responses={**FHIR_COVERAGE, **NOT_VERIFIED}
)
def get_fhir_coverage(case_id: str, session: SessionDep) -> JSONResponse:
    """The case's coverage as a FHIR R4 Coverage (the member id is masked)."""
    row = _verification(session, case_id)
    resource: dict[str, Any] = fhir_resources.coverage(row, find_plan(session, row.plan_code))
    return JSONResponse(resource, media_type="application/fhir+json")


def _verification(session: Session, case_id: str) -> CoverageVerification:
    row = session.exec(select(CoverageVerification).where(CoverageVerification.case_id == case_id)).first()
    if row is None or not row.cpt:
        raise HTTPException(
            404,
            "no coverage verification for this case; it is made when the case workflow sends "
            "insurance.verify, so retry later or check the case id",
        )
    return row
