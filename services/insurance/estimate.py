"""The patient's out-of-pocket estimate: pure arithmetic over a payer's answer and our self-pay price."""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal

from contracts.models import Coverage, CoverageStatus
from services.insurance.connectors import ZERO, Eligibility, PlanStanding

CENT = Decimal("0.01")


@dataclass(frozen=True)
class CostEstimate:
    coverage_status: CoverageStatus
    plan_code: str | None
    allowed_amount: Decimal
    patient_cost: Decimal
    explanation: str
    # The parts of the patient's share (zero when the patient pays the self-pay price).
    network: str = "unknown"
    copay: Decimal = ZERO
    deductible_applied: Decimal = ZERO
    deductible_remaining: Decimal | None = None
    coinsurance_pct: Decimal = ZERO
    coinsurance: Decimal = ZERO
    outcome: str = ""


def usd(amount: Decimal) -> str:
    return f"${amount.quantize(CENT, ROUND_HALF_UP):,.2f}"


def percent(fraction: Decimal) -> str:
    return f"{(fraction * 100).normalize():f}%"


def estimate_cost(
    coverage: Coverage, cpt: str, eligibility: Eligibility | None, self_pay_price: Decimal
) -> CostEstimate:
    """Decide coverage and the patient's cost; `eligibility` is needed unless the patient pays themselves."""
    if coverage.self_pay or not coverage.plan_code:
        why = "self-pay requested" if coverage.self_pay else "no insurance plan given"
        return _self_pay(
            CoverageStatus.SELF_PAY, None, self_pay_price, f"{why}; self-pay price for CPT {cpt}"
        )
    if eligibility is None:
        raise ValueError("a plan code was given but no eligibility answer; ask the payer connector first")
    if eligibility.standing is PlanStanding.UNKNOWN:
        return _self_pay(
            CoverageStatus.NOT_COVERED,
            coverage.plan_code,
            self_pay_price,
            f"plan code {coverage.plan_code} is not known to us",
        )
    if eligibility.standing is PlanStanding.REJECTED:
        return _self_pay(
            CoverageStatus.NOT_COVERED, eligibility.plan_code, self_pay_price, eligibility.detail
        )
    if eligibility.standing is PlanStanding.INACTIVE:
        return _self_pay(
            CoverageStatus.NOT_COVERED,
            eligibility.plan_code,
            self_pay_price,
            f"plan {eligibility.plan_code} ({eligibility.plan_name}) is no longer active",
        )
    if not eligibility.covers_service:
        return _self_pay(
            CoverageStatus.NOT_COVERED,
            eligibility.plan_code,
            self_pay_price,
            f"plan {eligibility.plan_code} ({eligibility.plan_name}) does not cover "
            f"second-opinion reads (CPT {cpt})",
        )
    return _covered(eligibility, cpt, self_pay_price)


def _self_pay(status: CoverageStatus, plan_code: str | None, price: Decimal, why: str) -> CostEstimate:
    if status is CoverageStatus.SELF_PAY:
        explanation = f"{why}: {usd(price)}"
    else:
        explanation = f"{why}; the patient can choose self-pay at {usd(price)}"
    return CostEstimate(status, plan_code, price, price, explanation)


def with_outcome(estimate: CostEstimate, eligibility: Eligibility | None) -> CostEstimate:
    """The estimate with the connector's outcome (or `self_pay`) recorded on it."""
    outcome = eligibility.outcome if eligibility is not None else "self_pay"
    network = eligibility.network if eligibility is not None else "unknown"
    return replace(estimate, outcome=estimate.outcome or outcome, network=network)


def _covered(eligibility: Eligibility, cpt: str, self_pay_price: Decimal) -> CostEstimate:
    notes = []
    allowed = eligibility.allowed_amount
    if allowed is None:
        allowed = self_pay_price
        notes.append(
            f"the plan has no fee for CPT {cpt}, so our self-pay price is used as the allowed amount"
        )
    met = eligibility.deductible_met
    if met is None:
        met = ZERO
        notes.append("the member's deductible progress is not on file, so none of it is counted as met")
    remaining = max(ZERO, eligibility.deductible - met)
    deductible_part = min(allowed, remaining)
    rest = allowed - deductible_part
    coinsurance = rest * eligibility.coinsurance_pct
    uncapped = eligibility.copay + deductible_part + coinsurance
    patient_cost = min(allowed, uncapped).quantize(CENT, ROUND_HALF_UP)

    parts = [
        f"copay {usd(eligibility.copay)}",
        f"deductible {usd(deductible_part)} (of {usd(remaining)} remaining)",
        f"coinsurance {percent(eligibility.coinsurance_pct)} of {usd(rest)} = {usd(coinsurance)}",
    ]
    total = f"patient cost {usd(patient_cost)}"
    if uncapped > allowed:
        total += f" (capped at the allowed amount; the parts add up to {usd(uncapped)})"
    explanation = (
        f"covered by {eligibility.plan_code} ({eligibility.plan_name}, {eligibility.network}-network): "
        f"allowed amount {usd(allowed)} for CPT {cpt}; " + " + ".join(parts) + f"; {total}"
    )
    if notes:
        explanation += "; note: " + "; ".join(notes)
    share = _share(eligibility.copay, deductible_part, coinsurance, patient_cost)
    return CostEstimate(
        CoverageStatus.COVERED,
        eligibility.plan_code,
        allowed,
        patient_cost,
        explanation,
        network=eligibility.network,
        copay=share[0],
        deductible_applied=share[1],
        deductible_remaining=None if eligibility.deductible_met is None else remaining,
        coinsurance_pct=eligibility.coinsurance_pct,
        coinsurance=share[2],
        outcome=eligibility.outcome,
    )


def _share(
    copay: Decimal, deductible: Decimal, coinsurance: Decimal, total: Decimal
) -> tuple[Decimal, Decimal, Decimal]:
    """The parts as charged: copay first, then deductible, then coinsurance, within the capped total."""
    left = total
    parts = []
    for part in (copay, deductible, coinsurance):
        charged = min(left, part.quantize(CENT, ROUND_HALF_UP))
        parts.append(charged)
        left -= charged
    return parts[0], parts[1], parts[2] + left
