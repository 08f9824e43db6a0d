"""/v1/coverage: the public plan list and each case's coverage decision."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from sqlmodel import Session, select

from services.common.db import get_engine
from services.insurance.models import (
    CoverageVerification,
    CoverageVerificationPublic,
    InsurancePlan,
    PlanPublic,
)

router = APIRouter(prefix="/v1/coverage", tags=["coverage"])


def get_session() -> Iterator[Session]:
    with Session(get_engine("insurance"), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@router.get("/plans", response_model=list[PlanPublic])
def list_plans(session: SessionDep, include_inactive: bool = False) -> list[InsurancePlan]:
    query = select(InsurancePlan).order_by(InsurancePlan.code)
    if not include_inactive:
        query = query.where(InsurancePlan.active)
    return list(session.exec(query).all())


@router.get(
    "/{case_id}",
    response_model=CoverageVerificationPublic,
    responses={404: {"description": "coverage for the case has not been verified (yet)"}},
)
def get_verification(case_id: str, session: SessionDep) -> CoverageVerification:
    row = session.exec(select(CoverageVerification).where(CoverageVerification.case_id == case_id)).first()
    if row is None:
        raise HTTPException(
            404,
            f"no coverage verification for case {case_id}; it is made when the case workflow sends "
            "insurance.verify, so retry later or check the case id",
        )
    return row
