"""How the X12 connector reads a payer's 271 (005010X279A1): which rows apply to a second-opinion read, what
counts as active, what it refuses. The payer here is a canned answer: a unit test of the reading rules; the
round trips against the payer sandbox process are in tests/integration/test_insurance_x12.py."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from contracts.models import Coverage, Patient
from services.insurance import fhir_resources
from services.insurance.estimate import CostEstimate
from services.insurance.models import InsurancePayer, InsurancePlan
from services.insurance.x12 import Party, X12Invalid, build_270, envelope, parse_271, segment
from services.insurance.x12_connector import Eligibility, Subscriber, X12Connector
from tests.unit.test_insurance_x12 import INQUIRY, a_271

S = segment
COVERAGE = Coverage(plan_code="SBX-PPO", member_id="SBX-MET")
PAYER = InsurancePayer(
    payer_id="SBX01",
    name="Sandbox Health",
    connector="x12",
    endpoint_url="http://127.0.0.1:9",
    timeout_seconds=1,
)
PLAN = InsurancePlan(
    code="SBX-PPO",
    plan_name="Gold",
    payer_name="Sandbox",
    payer_id="SBX01",
    active=True,
    covers_second_opinion=True,
    copay=Decimal("0"),
    coinsurance_pct=Decimal("0"),
    deductible=Decimal("0"),
    network="in",
    authorization_rule="none",
)
ACTIVE = S("EB", "1", "IND", "30", "PR", "Gold")
# The connector as a reading group's inquiry for a $240 read: what every test here and in
# test_insurance_core builds, with the payer's answers (or transport) its own.
CONNECTOR: dict[str, Any] = {
    "provider": Party("READING GROUP", "1234567893"),
    "network": "in",
    "allowed_amount": Decimal("240.00"),
    "trace": "c-42",
    "sleep": lambda _: None,
}


def answer(*subscriber: str, trace: str = "c-42", member: str = "SBX-MET") -> str:
    body = [
        S("BHT", "0022", "11", "c-42", "20261128", "1200"),
        S("HL", "1", "", "20", "1"),
        S("NM1", "PR", "2", "SANDBOX HEALTH", "", "", "", "", "PI", "SBX01"),
        S("HL", "2", "1", "21", "1"),
        S("NM1", "1P", "2", "READING GROUP", "", "", "", "", "XX", "1234567893"),
        S("HL", "3", "2", "22", "0"),
        S("TRN", "2", trace, "9SECONDOPN"),
        S("NM1", "IL", "1", "TESTER", "ANN", "", "", "", "MI", member),
        *subscriber,
    ]
    return envelope(body, functional_id="HB", sender="SBX01", receiver="SECONDOPINION", control=5)


class CannedPayer(X12Connector):
    """The connector with its HTTP post replaced by the answers given (the last one repeats)."""

    def __init__(self, *answers: str, **options: Any) -> None:
        super().__init__(PAYER, PLAN, **CONNECTOR, **options)
        self.answers = list(answers)
        self.sent: list[str] = []

    def _post(self, request: str) -> str:
        self.sent.append(request)
        request.encode("ascii")  # what the real post sends
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def check(*answers: str, coverage: Coverage = COVERAGE, **options: Any) -> Eligibility:
    return CannedPayer(*answers, **options).check(coverage, "76140")


def test_a_name_with_accents_or_delimiters_goes_out_as_plain_x12() -> None:
    patient = Patient(
        family_name="Núñez*Jr",
        given_name="José",
        birth_date=date(1980, 1, 2),
        sex="male",
        mrn="m",
        state="CA",
    )
    payer = CannedPayer(answer(ACTIVE), subscriber=Subscriber.of(patient))
    assert payer.check(COVERAGE, "76140").outcome == "active"
    assert "NM1*IL*1*NUNEZ JR*JOSE****MI*SBX-MET~" in payer.sent[0]


def test_a_member_id_an_x12_element_cannot_carry_is_an_outcome_not_a_crash() -> None:
    eligibility = check(answer(ACTIVE), coverage=Coverage(plan_code="SBX-PPO", member_id="AB~CD"))
    assert eligibility.outcome == "member_mismatch"
    assert "check the card" in eligibility.detail


def test_terms_are_the_individuals_for_the_service_asked() -> None:
    eligibility = check(
        answer(
            ACTIVE,
            S("EB", "B", "IND", "86", "PR", "", "27", "250.00", "", "", "", "", "Y"),  # emergency copay
            S("EB", "B", "IND", "98", "PR", "", "27", "20.00", "", "", "", "", "Y"),  # office visit copay
            S("EB", "C", "FAM", "30", "PR", "", "23", "3000.00", "", "", "", "", "Y"),
            S("EB", "C", "IND", "30", "PR", "", "23", "1000.00", "", "", "", "", "Y"),
            S("EB", "CB", "IND", "62", "PR", "", "", "", "", "", "", "Y"),  # MRI needs authorization
        )
    )
    assert (eligibility.copay, eligibility.deductible, eligibility.authorization_rule) == (
        Decimal("20.00"),
        Decimal("1000.00"),
        "none",
    )


def test_the_services_own_row_wins_over_the_plans() -> None:
    eligibility = check(
        answer(
            ACTIVE,
            S("EB", "B", "IND", "30", "PR", "", "27", "50.00", "", "", "", "", "Y"),
            S("EB", "B", "IND", "98", "PR", "", "27", "20.00", "", "", "", "", "Y"),
        )
    )
    assert eligibility.copay == Decimal("20.00")


@pytest.mark.parametrize("code", ["1", "2", "3", "4", "5"])
def test_every_active_coverage_code_is_active(code: str) -> None:
    assert check(answer(S("EB", code, "IND", "30", "PR", "Gold"))).outcome == "active"


def test_an_inactive_row_beside_an_active_one_and_a_service_not_covered() -> None:
    assert check(answer(S("EB", "6", "IND", "30"), ACTIVE)).outcome == "active"
    assert check(answer(S("EB", "6", "IND", "30"))).outcome == "inactive"
    not_covered = check(answer(ACTIVE, S("EB", "I", "IND", "4^98")))
    assert not_covered.covers_service is False


def test_an_answer_without_a_coverage_status_is_not_read_as_inactive() -> None:
    eligibility = check(answer(S("EB", "B", "IND", "98", "PR", "", "27", "20.00")))
    assert eligibility.outcome == "malformed_response"


def test_a_271_with_another_repetition_separator_is_read_with_its_own() -> None:
    document = answer(S("EB", "1", "IND", "4{98", "PR", "Gold")).replace("*^*00501*", "*{*00501*", 1)
    assert parse_271(document).benefits[0].service_types == ("4", "98")


def test_the_usage_indicator_is_configured() -> None:
    assert build_270(INQUIRY).split("*")[15] == "T"
    production = CannedPayer(answer(ACTIVE), usage="P")
    production.check(COVERAGE, "76140")
    assert production.sent[0].split("*")[15] == "P"


def test_a_truncated_271_is_refused() -> None:
    document = a_271(ACTIVE, S("EB", "C", "IND", "30", "PR", "", "23", "1000"))
    with pytest.raises(X12Invalid, match="(?i)missing"):
        parse_271(document[: document.index("SE*")])


def test_the_payers_current_member_id_with_the_one_asked_in_ref_q4_is_the_member() -> None:
    eligibility = check(answer(S("REF", "Q4", "SBX-MET"), ACTIVE, member="SBXMET01"))
    assert eligibility.outcome == "active"
    assert check(answer(ACTIVE, member="SOMEONE-ELSE")).outcome == "member_mismatch"


def test_an_answer_to_another_inquiry_is_refused() -> None:
    assert check(answer(ACTIVE, trace="someone-elses")).outcome == "malformed_response"


def test_every_attempt_has_its_own_control_number() -> None:
    busy = envelope(
        [
            S("BHT", "0022", "11", "c-42", "20261128", "1200"),
            S("HL", "1", "", "20", "1"),
            S("NM1", "PR", "2", "SANDBOX HEALTH", "", "", "", "", "PI", "SBX01"),
            S("AAA", "N", "", "42", "R"),
        ],
        functional_id="HB",
        sender="SBX01",
        receiver="SECONDOPINION",
        control=5,
    )
    payer = CannedPayer(busy)
    assert payer.check(COVERAGE, "76140").outcome == "payer_unavailable"
    assert len({document.split("*")[13] for document in payer.sent}) == len(payer.sent) == 3


def test_do_not_resubmit_is_obeyed() -> None:
    # AAA 42 (unable to respond now) with AAA04 = Y, "do not resubmit; we will notify you": asked once.
    payer = CannedPayer(answer(S("AAA", "Y", "", "42", "Y")))
    eligibility = payer.check(COVERAGE, "76140")
    assert eligibility.outcome == "payer_rejected"
    assert len(payer.sent) == 1


def test_a_ta1_is_the_payer_refusing_our_270() -> None:
    ta1 = (
        "ISA*00*          *00*          *ZZ*SBX01          *ZZ*SECONDOPINION  *261206*1200*^*00501*000000017*0*P*:~"
        "TA1*000000017*261206*1200*R*025~IEA*0*000000017~"
    )
    eligibility = check(ta1)
    assert eligibility.outcome == "payer_rejected"
    assert "025" in eligibility.detail


def _fhir_ask(patient: dict[str, Any], contained: list[dict[str, Any]] = ()) -> fhir_resources.EligibilityAsk:  # type: ignore[assignment]
    coverage = {
        "resourceType": "Coverage",
        "id": "cov",
        "status": "active",
        "beneficiary": {"display": "the patient"},
        "payor": [{"display": "Sandbox Health"}],
        "subscriberId": "SBX-MET",
        "class": [{"type": {"coding": [{"code": "plan"}]}, "value": "SBX-PPO"}],
    }
    return fhir_resources.read_request(
        {
            "resourceType": "CoverageEligibilityRequest",
            "status": "active",
            "purpose": ["benefits"],
            "patient": patient,
            "created": "2026-01-01",
            "insurer": {"display": "Sandbox Health"},
            "contained": [coverage, *contained],
            "insurance": [{"coverage": {"reference": "#cov"}}],
        }
    )


def test_a_contained_patient_names_the_subscriber_of_a_fhir_eligibility_request() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "pat",
        "name": [{"family": "Núñez", "given": ["José"]}],
        "birthDate": "1980-01-02",
        "gender": "male",
    }
    ask = _fhir_ask({"reference": "#pat"}, [patient])
    assert (ask.last_name, ask.first_name, ask.birth_date, ask.gender) == ("Núñez", "José", "19800102", "M")


def test_references_by_identifier_or_display_are_answered_as_given() -> None:
    ask = _fhir_ask({"identifier": {"system": "urn:mrn", "value": "1"}})
    estimate = CostEstimate("self_pay", None, Decimal(1), Decimal(1), "self-pay", outcome="self_pay")
    response = fhir_resources.eligibility_response(ask, estimate, "none", "r1")
    assert response["patient"] == {"identifier": {"system": "urn:mrn", "value": "1"}}
    assert response["insurer"] == {"display": "Sandbox Health"}


def test_when_the_payer_did_not_answer_the_response_claims_nothing_about_coverage() -> None:
    ask = _fhir_ask({"reference": "Patient/p"})
    estimate = CostEstimate(
        "not_covered",
        "SBX-PPO",
        Decimal(350),
        Decimal(350),
        "the payer did not answer",
        network="unknown",
        outcome="payer_unavailable",
    )
    response = fhir_resources.eligibility_response(ask, estimate, "none", "r1")
    insurance = response["insurance"][0]
    assert response["outcome"] == "error"
    assert "inforce" not in insurance
    assert "network" not in insurance["item"][0] and "excluded" not in insurance["item"][0]
