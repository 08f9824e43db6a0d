"""Plans, fees, member accumulators and verifications (tables), and what the API shows of them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from pydantic import BaseModel
from pydantic import Field as PydField
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


class InsurancePayer(SQLModel, table=True):
    """A payer and how we ask it: `plan_rules` (our own tables) or `x12` (a 270 to `endpoint_url`).

    `core_envelope`: the CAQH CORE envelope standard the payer's server speaks, `mime` (HTTP MIME multipart)
    or `soap` (SOAP 1.2 + WSDL); the rule asks a server for one of the two, and a client like us for both."""

    __tablename__ = "insurance_payers"
    __table_args__ = (
        sa.CheckConstraint("connector IN ('plan_rules', 'x12')", name="ck_insurance_payers_connector"),
        sa.CheckConstraint("core_envelope IN ('mime', 'soap')", name="ck_insurance_payers_core_envelope"),
    )

    payer_id: str = Field(primary_key=True, max_length=80)
    name: str = Field(max_length=200)
    connector: str = Field(default="plan_rules", max_length=20)
    endpoint_url: str | None = Field(default=None, max_length=500)
    timeout_seconds: float = 10.0
    core_envelope: str = Field(default="mime", max_length=10)


class InsurancePlan(InsurancePlanBase, table=True):
    __tablename__ = "insurance_plans"
    __table_args__ = (
        sa.CheckConstraint("network IN ('in', 'out')", name="ck_insurance_plans_network"),
        sa.CheckConstraint(
            "coinsurance_pct >= 0 AND coinsurance_pct <= 1", name="ck_insurance_plans_coinsurance"
        ),
        sa.CheckConstraint(
            "authorization_rule IN ('none', 'referral', 'prior_auth')",
            name="ck_insurance_plans_authorization",
        ),
    )

    payer_id: str | None = Field(default=None, foreign_key="insurance_payers.payer_id", max_length=80)
    # Whether a second-opinion read needs a referral or a prior authorization under this plan.
    authorization_rule: str = Field(default="none", max_length=20)


class InsuranceNetwork(SQLModel, table=True):
    """Whether an organization is in or out of a plan's network."""

    __tablename__ = "insurance_network"
    __table_args__ = (sa.CheckConstraint("status IN ('in', 'out')", name="ck_insurance_network_status"),)

    plan_code: str = Field(primary_key=True, foreign_key="insurance_plans.code", max_length=50)
    organization: str = Field(primary_key=True, max_length=200)
    status: str = Field(max_length=3)


class NetworkStatusPublic(BaseModel):
    plan_code: str
    organization: str
    network: str = PydField(description='"in", "out" or "unknown"')
    source: str = PydField(description='"network table", "plan default" or "not on file"')


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
    # What was asked (for re-verification and the FHIR Coverage) and the estimate's parts.
    member_id: str | None = Field(default=None, max_length=50)
    self_pay: bool = False
    patient_state: str = Field(default="", max_length=2)
    outcome: str = Field(default="", max_length=40)
    network: str = Field(default="unknown", max_length=10)
    copay: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)
    deductible_applied: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)
    deductible_remaining: Decimal | None = Field(default=None, max_digits=10, decimal_places=2)
    coinsurance_pct: Decimal = Field(default=Decimal("0"), max_digits=5, decimal_places=4)
    coinsurance_amount: Decimal = Field(default=Decimal("0.00"), max_digits=10, decimal_places=2)
    # "no-auth" | "auth-needed" | "satisfied", and what satisfied it.
    authorization: str = Field(default="no-auth", max_length=20)
    authorization_rule: str = Field(default="none", max_length=20)
    authorization_number: str | None = Field(default=None, max_length=50)
    referral_document_id: str | None = Field(default=None, max_length=100)
    authorized_by: str | None = Field(default=None, max_length=100)
    cancelled_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class EligibilityResponse(SQLModel, table=True):
    """A CoverageEligibilityResponse as answered to a FHIR CoverageEligibilityRequest, readable by the partner
    that asked (migration 0005), and the request it answers, kept with it under the same id (migration 0006:
    the response's `request` names it; answers given before kept no request). Neither changes: version 1."""

    __tablename__ = "eligibility_responses"

    id: str = Field(primary_key=True, max_length=36)
    # The asking key's partner; "" for an operations key (read by operations only).
    partner_id: str = Field(max_length=64)
    resource: str = Field(sa_type=sa.Text, description="the CoverageEligibilityResponse as JSON")
    request: str | None = Field(
        default=None, sa_type=sa.Text, description="the CoverageEligibilityRequest it answers, as JSON"
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


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
    outcome: str = ""
    network: str = "unknown"
    authorization: str = "no-auth"
    withdrawn: bool = False


class EstimatePublic(BaseModel):
    """The out-of-pocket estimate as shown to the patient before the review starts."""

    case_id: str
    cpt: str
    coverage_status: CoverageStatus
    plan_code: str | None
    network: str
    allowed_amount: Decimal
    deductible_remaining_before: Decimal | None
    deductible: Decimal
    copay: Decimal
    coinsurance_pct: Decimal
    coinsurance: Decimal
    patient_share: Decimal
    plan_pays: Decimal
    currency: str = "USD"
    authorization: str
    explanation: str
    verified_at: datetime
    stale: bool = PydField(
        description="older than the configured maximum age; it is re-checked before review"
    )


class AuthorizationCreate(BaseModel):
    """A referral document or a prior-authorization number, and who recorded it."""

    model_config = {"extra": "forbid"}

    authorization_number: str | None = PydField(
        default=None, min_length=3, max_length=50, pattern=r"^[A-Za-z0-9-]+$"
    )
    referral_document_id: str | None = PydField(default=None, min_length=1, max_length=100)
    by: str = PydField(min_length=1, max_length=100, description="a staff id, never a patient's name")


TABLES = (
    "insurance_payers",
    "insurance_plans",
    "insurance_fees",
    "insurance_member_accumulators",
    "insurance_network",
    "coverage_verifications",
    "eligibility_responses",
)
