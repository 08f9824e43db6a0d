"""Payer connectors: who answers "is this member covered for this procedure, and on what terms".

`PlanRules` answers from the plan rules kept in this service's database; `X12Connector`
(services/insurance/x12_connector.py) asks the payer with a 270. Which one a plan uses is its payer's
`connector` in the `insurance_payers` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from sqlmodel import Session, select

from contracts.models import Coverage
from services.insurance.models import (
    InsuranceFee,
    InsuranceMemberAccumulator,
    InsuranceNetwork,
    InsurancePlan,
)

ZERO = Decimal("0.00")


class PlanStanding(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    UNKNOWN = "unknown"
    # The payer answered but not with benefits: a rejection (AAA), a member mismatch, no usable answer.
    REJECTED = "rejected"


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
    # "none" | "referral" | "prior_auth": what a second-opinion read needs under this plan.
    authorization_rule: str = "none"
    # A specific, PHI-free outcome: active, inactive, plan_unknown, member_mismatch, payer_rejected, ...
    outcome: str = ""
    detail: str = ""


class PayerConnector(Protocol):
    def check(self, coverage: Coverage, cpt: str) -> Eligibility: ...


def network_status(session: Session, plan: InsurancePlan | None, organization: str) -> tuple[str, str]:
    """(status, source): the network table first, then the plan's default; "unknown" without a plan."""
    if plan is None:
        return "unknown", "not on file"
    row = session.get(InsuranceNetwork, (plan.code, organization))
    if row is not None:
        return row.status, "network table"
    return plan.network, "plan default"


def plan_fee(session: Session, plan_code: str, cpt: str) -> Decimal | None:
    fee = session.exec(
        select(InsuranceFee).where(InsuranceFee.plan_code == plan_code, InsuranceFee.cpt == cpt)
    ).first()
    return None if fee is None else fee.allowed_amount


def find_plan(session: Session, plan_code: str | None) -> InsurancePlan | None:
    return session.get(InsurancePlan, (plan_code or "").strip().upper())


class PlanRules:
    """Eligibility from the plans, fees and accumulators in the insurance schema."""

    def __init__(self, session: Session, organization: str = "") -> None:
        self.session = session
        self.organization = organization

    def check(self, coverage: Coverage, cpt: str) -> Eligibility:
        plan = find_plan(self.session, coverage.plan_code)
        if plan is None:
            return Eligibility(
                plan_code=coverage.plan_code or "", standing=PlanStanding.UNKNOWN, outcome="plan_unknown"
            )
        network, _ = network_status(self.session, plan, self.organization)
        return Eligibility(
            plan_code=plan.code,
            standing=PlanStanding.ACTIVE if plan.active else PlanStanding.INACTIVE,
            plan_name=plan.plan_name,
            covers_service=plan.covers_second_opinion,
            network=network,
            copay=plan.copay,
            coinsurance_pct=plan.coinsurance_pct,
            deductible=plan.deductible,
            deductible_met=self._deductible_met(plan.code, coverage.member_id),
            allowed_amount=plan_fee(self.session, plan.code, cpt),
            authorization_rule=plan.authorization_rule,
            outcome="active" if plan.active else "inactive",
        )

    def _deductible_met(self, plan_code: str, member_id: str | None) -> Decimal | None:
        if not member_id:
            return None
        accumulator = self.session.get(InsuranceMemberAccumulator, (plan_code, member_id.strip()))
        return None if accumulator is None else accumulator.deductible_met


def self_pay_price(session: Session, cpt: str) -> Decimal | None:
    """Our cash price for `cpt` (the fee row without a plan), or None if we do not price it."""
    fee = session.exec(
        select(InsuranceFee).where(
            InsuranceFee.plan_code.is_(None),  # type: ignore[union-attr]
            InsuranceFee.cpt == cpt,
        )
    ).first()
    return None if fee is None else fee.allowed_amount
