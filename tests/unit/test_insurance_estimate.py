from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from contracts.models import Coverage, CoverageStatus
from services.insurance.connectors import Eligibility, PlanStanding
from services.insurance.estimate import estimate_cost, percent, usd

D = Decimal
SELF_PAY = D("350.00")

PPO = Eligibility(
    plan_code="ACME-PPO",
    standing=PlanStanding.ACTIVE,
    plan_name="Acme Choice PPO",
    covers_service=True,
    copay=D("25.00"),
    coinsurance_pct=D("0.20"),
    deductible=D("500.00"),
    deductible_met=D("0.00"),
    allowed_amount=D("212.40"),
)
PLAN = Coverage(plan_code="ACME-PPO", member_id="M1")


@pytest.mark.parametrize(
    ("case", "eligibility", "status", "allowed", "cost"),
    [
        # deductible not met: the whole allowed amount goes to the deductible; copay on top is capped
        ("deductible not met", PPO, CoverageStatus.COVERED, "212.40", "212.40"),
        # $80 left: 25 + 80 + 20% of 132.40 (26.48)
        (
            "deductible partly met",
            replace(PPO, deductible_met=D("420.00")),
            CoverageStatus.COVERED,
            "212.40",
            "131.48",
        ),
        # 25 + 20% of 212.40 (42.48)
        (
            "deductible fully met",
            replace(PPO, deductible_met=D("500.00")),
            CoverageStatus.COVERED,
            "212.40",
            "67.48",
        ),
        (
            "met more than the deductible",
            replace(PPO, deductible_met=D("900.00")),
            CoverageStatus.COVERED,
            "212.40",
            "67.48",
        ),
        (
            "copay only",
            replace(
                PPO,
                copay=D("40.00"),
                coinsurance_pct=D("0"),
                deductible=D("0.00"),
                allowed_amount=D("185.00"),
            ),
            CoverageStatus.COVERED,
            "185.00",
            "40.00",
        ),
        # 10% of 238.75 = 23.875, rounded half-up
        (
            "coinsurance only",
            replace(
                PPO,
                copay=D("0.00"),
                coinsurance_pct=D("0.10"),
                deductible=D("3000.00"),
                deductible_met=D("3000.00"),
                allowed_amount=D("238.75"),
            ),
            CoverageStatus.COVERED,
            "238.75",
            "23.88",
        ),
        (
            "no plan fee: self-pay price is the allowed amount",
            replace(PPO, deductible_met=D("500.00"), allowed_amount=None),
            CoverageStatus.COVERED,
            "350.00",
            "95.00",
        ),
        (
            "no accumulator on file: nothing counted as met",
            replace(PPO, deductible_met=None),
            CoverageStatus.COVERED,
            "212.40",
            "212.40",
        ),
        (
            "plan does not cover",
            replace(PPO, covers_service=False),
            CoverageStatus.NOT_COVERED,
            "350.00",
            "350.00",
        ),
        (
            "plan inactive",
            replace(PPO, standing=PlanStanding.INACTIVE),
            CoverageStatus.NOT_COVERED,
            "350.00",
            "350.00",
        ),
        (
            "plan unknown",
            Eligibility(plan_code="ACME-PPO", standing=PlanStanding.UNKNOWN),
            CoverageStatus.NOT_COVERED,
            "350.00",
            "350.00",
        ),
    ],
)
def test_estimate_for_a_plan(
    case: str, eligibility: Eligibility, status: CoverageStatus, allowed: str, cost: str
) -> None:
    estimate = estimate_cost(PLAN, "76140", eligibility, SELF_PAY)
    assert (estimate.coverage_status, estimate.allowed_amount, estimate.patient_cost) == (
        status,
        D(allowed),
        D(cost),
    ), case
    assert estimate.patient_cost == estimate.patient_cost.quantize(D("0.01"))
    assert estimate.plan_code == "ACME-PPO"


@pytest.mark.parametrize(
    ("coverage", "why"),
    [
        (Coverage(self_pay=True), "self-pay requested"),
        (Coverage(self_pay=True, plan_code="ACME-PPO", member_id="M1"), "self-pay requested"),
        (Coverage(), "no insurance plan given"),
    ],
)
def test_self_pay_costs_the_self_pay_price(coverage: Coverage, why: str) -> None:
    estimate = estimate_cost(coverage, "76140", PPO, SELF_PAY)
    assert estimate.coverage_status is CoverageStatus.SELF_PAY
    assert (estimate.allowed_amount, estimate.patient_cost, estimate.plan_code) == (SELF_PAY, SELF_PAY, None)
    assert estimate.explanation == f"{why}; self-pay price for CPT 76140: $350.00"


def test_unknown_plan_explains_self_pay_option() -> None:
    estimate = estimate_cost(
        Coverage(plan_code="NOPE-1"), "76140", Eligibility("NOPE-1", PlanStanding.UNKNOWN), SELF_PAY
    )
    assert (
        estimate.explanation
        == "plan code NOPE-1 is not known to us; the patient can choose self-pay at $350.00"
    )
    assert estimate.plan_code == "NOPE-1"


def test_not_covered_explanations_say_why() -> None:
    inactive = estimate_cost(PLAN, "76140", replace(PPO, standing=PlanStanding.INACTIVE), SELF_PAY)
    assert "is no longer active" in inactive.explanation
    assert inactive.explanation.endswith("the patient can choose self-pay at $350.00")
    not_covering = estimate_cost(PLAN, "76140", replace(PPO, covers_service=False), SELF_PAY)
    assert "does not cover second-opinion reads (CPT 76140)" in not_covering.explanation


def test_covered_explanation_lists_the_parts() -> None:
    estimate = estimate_cost(PLAN, "76140", replace(PPO, deductible_met=D("420.00")), SELF_PAY)
    assert estimate.explanation == (
        "covered by ACME-PPO (Acme Choice PPO, in-network): allowed amount $212.40 for CPT 76140; "
        "copay $25.00 + deductible $80.00 (of $80.00 remaining) + coinsurance 20% of $132.40 = $26.48; "
        "patient cost $131.48"
    )


def test_capped_explanation_says_so() -> None:
    estimate = estimate_cost(PLAN, "76140", PPO, SELF_PAY)
    assert (
        "patient cost $212.40 (capped at the allowed amount; the parts add up to $237.40)"
        in estimate.explanation
    )


def test_a_plan_code_without_an_answer_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no eligibility answer"):
        estimate_cost(PLAN, "76140", None, SELF_PAY)


@pytest.mark.parametrize(
    ("amount", "text"), [(D("3000"), "$3,000.00"), (D("0.005"), "$0.01"), (D("23.875"), "$23.88")]
)
def test_usd(amount: Decimal, text: str) -> None:
    assert usd(amount) == text


@pytest.mark.parametrize(("fraction", "text"), [(D("0.20"), "20%"), (D("0.125"), "12.5%"), (D("0"), "0%")])
def test_percent(fraction: Decimal, text: str) -> None:
    assert percent(fraction) == text


@pytest.mark.parametrize(
    ("case", "eligibility", "copay", "deductible", "coinsurance", "remaining", "share"),
    [
        (
            "deductible fully met",
            replace(PPO, deductible_met=D("500.00")),
            "25.00",
            "0.00",
            "42.48",
            "0.00",
            "67.48",
        ),
        ("$80 left", replace(PPO, deductible_met=D("420.00")), "25.00", "80.00", "26.48", "80.00", "131.48"),
        # capped at the allowed amount: the copay is charged first, the deductible takes the rest
        ("deductible not met, capped", PPO, "25.00", "187.40", "0.00", "500.00", "212.40"),
        (
            "no accumulator on file",
            replace(PPO, deductible_met=None),
            "25.00",
            "187.40",
            "0.00",
            None,
            "212.40",
        ),
        (
            "coinsurance rounds half-up",
            replace(
                PPO,
                copay=D("0"),
                coinsurance_pct=D("0.10"),
                deductible_met=D("500"),
                allowed_amount=D("238.75"),
            ),
            "0.00",
            "0.00",
            "23.88",
            "0.00",
            "23.88",
        ),
        (
            "copay larger than the allowed amount",
            replace(PPO, copay=D("300.00"), deductible_met=D("500")),
            "212.40",
            "0.00",
            "0.00",
            "0.00",
            "212.40",
        ),
    ],
)
def test_estimate_breakdown_adds_up_to_the_patient_share(
    case: str,
    eligibility: Eligibility,
    copay: str,
    deductible: str,
    coinsurance: str,
    remaining: str | None,
    share: str,
) -> None:
    estimate = estimate_cost(PLAN, "76140", eligibility, SELF_PAY)
    assert (estimate.copay, estimate.deductible_applied, estimate.coinsurance) == (
        D(copay),
        D(deductible),
        D(coinsurance),
    ), case
    assert estimate.deductible_remaining == (None if remaining is None else D(remaining)), case
    assert (
        estimate.patient_cost
        == D(share)
        == estimate.copay + estimate.deductible_applied + estimate.coinsurance
    )


def test_a_rejected_answer_offers_self_pay_with_the_payers_reason() -> None:
    rejected = Eligibility(
        "SBX-PPO", PlanStanding.REJECTED, outcome="member_mismatch", detail="AAA 75 subscriber not found"
    )
    estimate = estimate_cost(Coverage(plan_code="SBX-PPO", member_id="M"), "76140", rejected, SELF_PAY)
    assert (estimate.coverage_status, estimate.patient_cost) == (CoverageStatus.NOT_COVERED, SELF_PAY)
    assert estimate.explanation == "AAA 75 subscriber not found; the patient can choose self-pay at $350.00"
