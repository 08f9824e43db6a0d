"""X12 270/271 round trips against the payer sandbox process, through the insurance service's handler, in
the CAQH CORE MIME multipart envelope the sandbox speaks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, Coverage, InsuranceVerified, Patient, VerifyInsurance
from services.common import migrate
from services.common.config import Settings
from services.common.db import Outbox, make_engine
from services.insurance import handlers
from services.insurance.core import CoreLogin, core_request, read_envelope
from services.insurance.models import AuthorizationCreate, CoverageVerification, InsurancePayer
from services.insurance.settings import InsuranceSettings
from services.insurance.x12 import build_270, parse_271
from tests.payer_sandbox.process import running_sandbox, sandbox_payer
from tests.unit.test_insurance_x12 import INQUIRY

D = Decimal
FAST = InsuranceSettings(payer_attempts=3, payer_backoff_seconds=0.05)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    with running_sandbox() as port:
        yield f"http://127.0.0.1:{port}/core/eligibility"


@pytest.fixture(scope="module")
def engine(settings: Settings, sandbox: str) -> Iterator[Engine]:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    with sandbox_payer(engine, sandbox):
        yield engine


def verify(
    engine: Engine,
    plan: str,
    member: str,
    settings: Settings,
    patient: Patient | None = None,
    config: InsuranceSettings = FAST,
) -> InsuranceVerified:
    case_id = f"c-{uuid.uuid4().hex[:12]}"
    cmd = VerifyInsurance(
        case_id=case_id,
        coverage=Coverage(plan_code=plan, member_id=member),
        patient_state="CA",
        patient=patient,
    )
    event_id = f"case-{case_id}:verify-insurance-1"
    with Session(engine) as session:
        handlers.verify(cmd, session, settings, event_id=event_id, insurance_settings=config)
        session.commit()
        row = session.exec(select(Outbox).where(Outbox.message_id == f"{event_id}>insurance.verified")).one()
    return InsuranceVerified.model_validate(CloudEvent.model_validate_json(row.body).data)


@pytest.mark.parametrize(
    ("case", "plan", "member", "status", "outcome", "network", "cost", "authorization"),
    [
        # deductible met: $20 copay + 20% of $240 = $68
        ("active, deductible met", "SBX-PPO", "SBX-MET", "covered", "active", "in", "68.00", "no-auth"),
        # deductible not met: the whole $240 goes to the deductible (the copay on top is capped)
        ("deductible not met", "SBX-PPO", "SBX-NOTMET", "covered", "active", "in", "240.00", "no-auth"),
        # $50 left: 20 + 50 + 20% of 190 = 108
        ("deductible partly met", "SBX-PPO", "SBX-PARTLY", "covered", "active", "in", "108.00", "no-auth"),
        # out of network: no copay, 40% of 240 (the deductible is met)
        ("out of network", "SBX-EPO", "SBX-MET", "covered", "active", "out", "96.00", "no-auth"),
        ("inactive", "SBX-PPO", "SBX-INACTIVE", "not_covered", "inactive", "in", "350.00", "no-auth"),
        (
            "referral required (EB11)",
            "SBX-PPO",
            "SBX-REFERRAL",
            "covered",
            "active",
            "in",
            "35.00",
            "auth-needed",
        ),
        (
            "rejected: member not found",
            "SBX-PPO",
            "NO-SUCH-MEMBER",
            "not_covered",
            "member_mismatch",
            "in",
            "350.00",
            "no-auth",
        ),
        ("transient AAA 42, retried", "SBX-PPO", "SBX-FLAKY", "covered", "active", "in", "68.00", "no-auth"),
        (
            "payer busy every time",
            "SBX-PPO",
            "SBX-BUSY",
            "not_covered",
            "payer_unavailable",
            "in",
            "350.00",
            "no-auth",
        ),
        (
            "malformed 271",
            "SBX-PPO",
            "SBX-GARBLED",
            "not_covered",
            "malformed_response",
            "in",
            "350.00",
            "no-auth",
        ),
    ],
)
def test_x12_round_trip(
    engine: Engine,
    settings: Settings,
    case: str,
    plan: str,
    member: str,
    status: str,
    outcome: str,
    network: str,
    cost: str,
    authorization: str,
) -> None:
    verified = verify(engine, plan, member, settings)
    assert (verified.coverage_status, verified.outcome, verified.network) == (status, outcome, network), case
    assert (verified.patient_cost, verified.authorization) == (D(cost), authorization), case
    assert member not in verified.explanation


def subscriber(family_name: str) -> Patient:
    return Patient(
        family_name=family_name,
        given_name="Pat",
        birth_date=date(1980, 1, 2),
        sex="female",
        mrn="M",
        state="CA",
    )


def test_the_270_names_the_subscriber_and_a_wrong_name_is_rejected(
    engine: Engine, settings: Settings
) -> None:
    # The payer holds SBX-MET as TESTER: the patient's name travels in the 270 (NM1*IL, DMG) and is matched.
    assert verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester")).coverage_status == "covered"
    wrong = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Someone"))
    assert wrong.coverage_status == "not_covered" and wrong.outcome == "member_mismatch"
    assert "AAA 73 invalid or missing subscriber name" in wrong.explanation
    assert "Someone" not in wrong.explanation  # the explanation names the problem, never the PHI


def test_recording_an_authorization_keeps_what_the_named_inquiry_found(
    engine: Engine, settings: Settings
) -> None:
    # SBX-NAMED's payer answers only a 270 that names the member (the guide's required search option). The
    # case's verification named her; recording the authorization must not turn it into a nameless re-ask
    # that the payer refuses (AAA 73), which would record a covered patient as not covered.
    verified = verify(engine, "SBX-PPO", "SBX-NAMED", settings, subscriber("Tester"))
    assert (verified.coverage_status, verified.authorization) == ("covered", "auth-needed")
    with Session(engine) as session:
        row = handlers.authorize(
            verified.case_id, AuthorizationCreate(authorization_number="PA-77", by="staff-1"), session
        )
        session.commit()
        assert (row.coverage_status, row.outcome, row.authorization) == ("covered", "active", "satisfied")
    nameless = verify(engine, "SBX-PPO", "SBX-NAMED", settings)
    assert (nameless.outcome, nameless.coverage_status) == ("member_mismatch", "not_covered")


def test_rejection_explains_what_to_fix(engine: Engine, settings: Settings) -> None:
    verified = verify(engine, "SBX-PPO", "NO-SUCH-MEMBER", settings)
    assert "AAA 75 subscriber not found" in verified.explanation
    assert "check the member id" in verified.explanation
    assert verified.explanation.endswith("the patient can choose self-pay at $350.00")


def test_timeout_is_retried_then_reported(engine: Engine, settings: Settings) -> None:
    with Session(engine) as session:
        payer = session.get(InsurancePayer, "SBX01")
        assert payer is not None
        payer.timeout_seconds = 0.3
        session.add(payer)
        session.commit()
    try:
        started = time.monotonic()
        verified = verify(engine, "SBX-PPO", "SBX-SLOW", settings)
        elapsed = time.monotonic() - started
    finally:
        with Session(engine) as session:
            payer = session.get(InsurancePayer, "SBX01")
            assert payer is not None
            payer.timeout_seconds = 2.0
            session.add(payer)
            session.commit()
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_unavailable")
    assert "did not give an answer after 3 attempts (no answer within 0.3 s)" in verified.explanation
    assert elapsed >= 0.9


def test_unconfigured_endpoint_is_a_payer_outcome(engine: Engine, settings: Settings) -> None:
    with Session(engine) as session:
        payer = session.get(InsurancePayer, "SBX01")
        assert payer is not None
        url, payer.endpoint_url = payer.endpoint_url, None
        session.add(payer)
        session.commit()
    try:
        verified = verify(engine, "SBX-PPO", "SBX-MET", settings)
    finally:
        with Session(engine) as session:
            payer = session.get(InsurancePayer, "SBX01")
            assert payer is not None
            payer.endpoint_url = url
            session.add(payer)
            session.commit()
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_unknown")


def test_breakdown_is_recorded_for_the_estimate(engine: Engine, settings: Settings) -> None:
    verified = verify(engine, "SBX-PPO", "SBX-PARTLY", settings)
    assert (verified.copay, verified.deductible_applied, verified.coinsurance) == (
        D("20.00"),
        D("50.00"),
        D("38.00"),
    )
    assert verified.deductible_remaining == D("50.00")
    with Session(engine) as session:
        row = session.exec(
            select(CoverageVerification).where(CoverageVerification.case_id == verified.case_id)
        ).one()
    assert (row.outcome, row.member_id, row.network) == ("active", "SBX-PARTLY", "in")


def test_a_wrong_core_password_is_payer_rejected_and_names_the_settings(
    engine: Engine, settings: Settings
) -> None:
    # The operator's view: INSURANCE_CORE_PASSWORD set wrong. The payer refuses the login (CORE UnAuthorized);
    # the case gets a specific outcome that says what to fix, not a dead letter.
    a_wrong_password_is_refused(engine, settings, "refused our CAQH CORE login (UnAuthorized)")


def a_wrong_password_is_refused(engine: Engine, settings: Settings, says: str) -> None:
    """INSURANCE_CORE_PASSWORD set wrong: payer_rejected saying `says` and naming the setting, never the
    password or the member; with the password as configured again, the same member is covered."""
    wrong = InsuranceSettings(
        payer_attempts=3, payer_backoff_seconds=0.05, core_password="not-the-Sandbox-pw"
    )
    verified = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=wrong)
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_rejected")
    assert says in verified.explanation
    assert "INSURANCE_CORE_PASSWORD" in verified.explanation
    assert "not-the-Sandbox-pw" not in verified.explanation and "sandbox-only" not in verified.explanation
    assert "SBX-MET" not in verified.explanation and "Tester" not in verified.explanation
    assert verify(engine, "SBX-PPO", "SBX-MET", settings).coverage_status == "covered"


def test_an_answer_carrying_another_requests_payload_id_is_refused(
    engine: Engine, settings: Settings
) -> None:
    # SBX-MIXUP's 271 is a good one, but its envelope answers another PayloadID: it is not our answer.
    verified = verify(engine, "SBX-PPO", "SBX-MIXUP", settings)
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "malformed_response")
    assert "its PayloadID is not the one we sent" in verified.explanation


def post_envelope(url: str, **changes: str | None) -> tuple[int, dict[str, str]]:
    """POST a CORE real-time envelope for SBX-MET to the sandbox, with fields changed (None: left out)."""
    login = CoreLogin.of(InsuranceSettings())
    fields: dict[str, str | None] = {
        **core_request(
            build_270(INQUIRY),
            payload_id=str(uuid.uuid1()),
            login=login,
            receiver_id="SBX01",
            at=datetime.now(UTC),
        ),
        **changes,
    }
    sent = {name: value for name, value in fields.items() if value is not None}
    payload = sent.pop("Payload", "")
    response = httpx.post(url, data=sent, files={"Payload": (None, payload.encode())}, timeout=5)
    return response.status_code, read_envelope(response.headers["content-type"], response.content)


def test_the_sandbox_answers_in_the_core_envelope_and_echoes_the_payload_id(sandbox: str) -> None:
    payload_id = str(uuid.uuid1())
    status, answer = post_envelope(sandbox, PayloadID=payload_id)
    assert (status, answer["ErrorCode"], answer["PayloadID"]) == (200, "Success", payload_id)
    assert (answer["PayloadType"], answer["ProcessingMode"], answer["CORERuleVersion"]) == (
        "X12_271_Response_005010X279A1",
        "RealTime",
        "2.2.0",
    )
    assert (answer["SenderID"], answer["ReceiverID"]) == ("SBX01", "SECONDOPINION")
    assert datetime.fromisoformat(answer["TimeStamp"]).utcoffset() is not None
    assert parse_271(answer["Payload"]).traces == ("c-42",)


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"Password": "wrong"}, 401, "UnAuthorized"),
        ({"UserName": None, "Password": None}, 401, "UnAuthorized"),
        ({"PayloadID": None}, 400, "PayloadIDRequired"),
        ({"PayloadID": "not-a-uuid"}, 400, "PayloadIDIllegal"),
        ({"CORERuleVersion": "4.0.0"}, 400, "VersionMismatch"),
        ({"TimeStamp": "2026-12-06T12:00:00"}, 400, "TimeStampIllegal"),  # no offset
        ({"ReceiverID": "ACME"}, 403, "Sender/ReceiverNotAuthorized"),
        ({"SenderID": "SOMEONE-ELSE"}, 403, "Sender/ReceiverNotAuthorized"),
    ],
)
def test_the_sandbox_refuses_an_envelope_it_cannot_take(
    sandbox: str, changes: dict[str, str | None], status: int, code: str
) -> None:
    got_status, answer = post_envelope(sandbox, **changes)
    assert (got_status, answer["ErrorCode"], answer["PayloadType"]) == (status, code, "CoreEnvelopeError")
    assert "Payload" not in answer
