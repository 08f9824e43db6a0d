"""Plans, fees, member accumulators and verifications (tables), and what the API shows of them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Field, SQLModel

from contracts.models import CoverageStatus
from services.common.db import utcnow


class InsurancePlanBase(SQLModel):
    code: str = Field(primary_key=True, max_length=50)
    payer_name: str = Field(max_length=200)
    plan_name: str = Field(max_length=200)
    active: bool = True
    covers_second_opinion: bool = True
    copay: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)
    coinsurance_pct: Decimal = Field(default=Decimal("0"), max_digits=5, decimal_places=4)
    deductible: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)
    network: str = Field(default="in", max_length=3, description='"in" or "out" of network')


class InsurancePlan(InsurancePlanBase, table=True):
    __tablename__ = "insurance_plans"
    __table_args__ = (
        sa.CheckConstraint("network IN ('in', 'out')", name="ck_insurance_plans_network"),
        sa.CheckConstraint(
            "coinsurance_pct >= 0 AND coinsurance_pct <= 1", name="ck_insurance_plans_coinsurance"
        ),
    )


class PlanPublic(InsurancePlanBase):
    """A plan as anyone may see it: its terms, never a member's data."""


class InsuranceFee(SQLModel, table=True):
    """The allowed amount for a CPT code under a plan; the row without a plan is our self-pay price."""

    __tablename__ = "insurance_fees"
    __table_args__ = (
        sa.UniqueConstraint("cpt", "plan_code", name="uq_insurance_fees_cpt_plan"),
        # NULLs are distinct in a unique constraint, so one self-pay price per CPT needs its own index.
        sa.Index(
            "uq_insurance_fees_self_pay",
            "cpt",
            unique=True,
            sqlite_where=sa.text("plan_code IS NULL"),
            postgresql_where=sa.text("plan_code IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    cpt: str = Field(max_length=20)
    plan_code: str | None = Field(default=None, foreign_key="insurance_plans.code", max_length=50)
    allowed_amount: Decimal = Field(max_digits=10, decimal_places=2)


class InsuranceMemberAccumulator(SQLModel, table=True):
    """How much of the plan-year deductible a member has met so far."""

    __tablename__ = "insurance_member_accumulators"

    plan_code: str = Field(primary_key=True, foreign_key="insurance_plans.code", max_length=50)
    member_id: str = Field(primary_key=True, max_length=50)
    deductible_met: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)


class CoverageVerification(SQLModel, table=True):
    """The latest coverage decision for a case; a repeated or newer command overwrites it."""

    __tablename__ = "coverage_verifications"

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(unique=True, max_length=100)
    source_event_id: str = Field(max_length=300)
    plan_code: str | None = Field(default=None, max_length=50)
    coverage_status: str = Field(max_length=20)
    cpt: str = Field(max_length=20)
    allowed_amount: Decimal = Field(max_digits=10, decimal_places=2)
    patient_cost: Decimal = Field(max_digits=10, decimal_places=2)
    explanation: str = Field(sa_type=sa.Text)
    verified_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class CoverageVerificationPublic(BaseModel):
    case_id: str
    coverage_status: CoverageStatus
    plan_code: str | None
    cpt: str
    allowed_amount: Decimal
    patient_cost: Decimal
    currency: str = "USD"
    explanation: str
    verified_at: datetime


TABLES = ("insurance_plans", "insurance_fees", "insurance_member_accumulators", "coverage_verifications")
