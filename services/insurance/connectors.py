"""Payer connectors: who answers "is this member covered for this procedure, and on what terms".

`PlanRules` answers from the plan rules kept in this service's database. X12 270/271 and FHIR
CoverageEligibilityRequest connectors will implement the same `PayerConnector` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from sqlmodel import Session, select

from contracts.models import Coverage
from services.insurance.models import InsuranceFee, InsuranceMemberAccumulator, InsurancePlan

ZERO = Decimal("0.00")


class PlanStanding(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Eligibility:
    """What a payer says about a member's plan for one procedure."""

    plan_code: str
    standing: PlanStanding
    plan_name: str = ""
    covers_service: bool = False
    network: str = "in"
    copay: Decimal = ZERO
    coinsurance_pct: Decimal = ZERO
    deductible: Decimal = ZERO
    # None: the payer could not tell (no member id, or no accumulator on file).
    deductible_met: Decimal | None = None
    # None: the payer has no fee for this procedure; the self-pay price stands in.
    allowed_amount: Decimal | None = None


class PayerConnector(Protocol):
    def check(self, coverage: Coverage, cpt: str) -> Eligibility: ...


class PlanRules:
    """Eligibility from the plans, fees and accumulators in the insurance schema."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def check(self, coverage: Coverage, cpt: str) -> Eligibility:
        code = (coverage.plan_code or "").strip().upper()
        plan = self.session.get(InsurancePlan, code)
        if plan is None:
            return Eligibility(plan_code=coverage.plan_code or "", standing=PlanStanding.UNKNOWN)
        return Eligibility(
            plan_code=plan.code,
            standing=PlanStanding.ACTIVE if plan.active else PlanStanding.INACTIVE,
            plan_name=plan.plan_name,
            covers_service=plan.covers_second_opinion,
            network=plan.network,
            copay=plan.copay,
            coinsurance_pct=plan.coinsurance_pct,
            deductible=plan.deductible,
            deductible_met=self._deductible_met(plan.code, coverage.member_id),
            allowed_amount=self._plan_fee(plan.code, cpt),
        )

    def _deductible_met(self, plan_code: str, member_id: str | None) -> Decimal | None:
        if not member_id:
            return None
        accumulator = self.session.get(InsuranceMemberAccumulator, (plan_code, member_id.strip()))
        return None if accumulator is None else accumulator.deductible_met

    def _plan_fee(self, plan_code: str, cpt: str) -> Decimal | None:
        fee = self.session.exec(
            select(InsuranceFee).where(InsuranceFee.plan_code == plan_code, InsuranceFee.cpt == cpt)
        ).first()
        return None if fee is None else fee.allowed_amount


def self_pay_price(session: Session, cpt: str) -> Decimal | None:
    """Our cash price for `cpt` (the fee row without a plan), or None if we do not price it."""
    fee = session.exec(
        select(InsuranceFee).where(
            InsuranceFee.plan_code.is_(None),  # type: ignore[union-attr]
            InsuranceFee.cpt == cpt,
        )
    ).first()
    return None if fee is None else fee.allowed_amount
