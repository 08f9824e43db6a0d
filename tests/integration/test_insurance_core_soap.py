"""X12 270/271 round trips against the payer sandbox process in the CAQH CORE SOAP+WSDL form (SOAP 1.2, the login
as a WS-Security UsernameToken), through the insurance service's handler: the payer's `core_envelope` is `soap`
and its endpoint the sandbox's `POST /core/soap`, which reads the envelope with its own parser."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from structlog.testing import capture_logs

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.insurance.core import CoreLogin
from services.insurance.core_soap import CONTENT_TYPE, read_soap_envelope, soap_request
from services.insurance.models import InsurancePayer
from services.insurance.settings import InsuranceSettings
from services.insurance.x12 import build_270, parse_271
from tests.integration.test_insurance_x12 import a_wrong_password_is_refused, verify
from tests.payer_sandbox.process import running_sandbox, sandbox_payer
from tests.unit.test_insurance_x12 import INQUIRY


@pytest.fixture(scope="module")
def soap_url() -> Iterator[str]:
    """The payer sandbox process, asked on its SOAP endpoint."""
    with running_sandbox() as port:
        yield f"http://127.0.0.1:{port}/core/soap"


@pytest.fixture(scope="module")
def engine(settings: Settings, soap_url: str) -> Iterator[Engine]:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    with Session(engine) as session:
        payer = session.get(InsurancePayer, "SBX01")
        assert payer is not None and payer.core_envelope == "mime"  # the migration's default
    with sandbox_payer(engine, soap_url, "soap"):
        yield engine


@pytest.mark.parametrize(
    ("case", "member", "status", "outcome", "cost", "said"),
    [
        ("active, deductible met", "SBX-MET", "covered", "active", "68.00", ""),
        ("deductible partly met", "SBX-PARTLY", "covered", "active", "108.00", ""),
        ("member not found", "NO-SUCH-MEMBER", "not_covered", "member_mismatch", "350.00", "AAA 75"),
        ("AAA 42 once, retried", "SBX-FLAKY", "covered", "active", "68.00", ""),
        ("AAA 42 every time", "SBX-BUSY", "not_covered", "payer_unavailable", "350.00", "AAA 42"),
        (
            "another PayloadID",
            "SBX-MIXUP",
            "not_covered",
            "malformed_response",
            "350.00",
            "its PayloadID is not",
        ),
    ],
)
def test_soap_round_trip(
    engine: Engine,
    settings: Settings,
    case: str,
    member: str,
    status: str,
    outcome: str,
    cost: str,
    said: str,
) -> None:
    verified = verify(engine, "SBX-PPO", member, settings)
    assert (verified.coverage_status, verified.outcome, verified.patient_cost) == (
        status,
        outcome,
        Decimal(cost),
    ), case
    assert said in verified.explanation, case
    assert member not in verified.explanation


def test_a_busy_payer_is_retried(engine: Engine, settings: Settings) -> None:
    # SBX-CORE-BUSY's first two inquiries get a SOAP Fault env:Receiver (CORE Busy); the third is answered.
    with capture_logs() as logs:
        verified = verify(engine, "SBX-PPO", "SBX-CORE-BUSY", settings)
    assert (verified.coverage_status, verified.outcome) == ("covered", "active")
    busy = [entry["reason"] for entry in logs if entry["event"] == "payer.busy"]
    assert busy == ["SOAP Fault Receiver Busy"] * 2


def test_a_wrong_password_is_a_soap_fault_and_payer_rejected_naming_the_settings(
    engine: Engine, settings: Settings
) -> None:
    a_wrong_password_is_refused(
        engine, settings, "refused our CAQH CORE login (SOAP Fault Sender FailedAuthentication)"
    )


def post_soap(url: str, login: CoreLogin | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    """POST a CORE SOAP request for SBX-MET to the sandbox (or the body given); its status and answer."""
    envelope = body or soap_request(
        build_270(INQUIRY),
        payload_id=str(uuid.uuid1()),
        login=login or CoreLogin.of(InsuranceSettings()),
        receiver_id="SBX01",
        at=datetime.now(UTC),
    )
    response = httpx.post(url, content=envelope, headers={"Content-Type": CONTENT_TYPE}, timeout=5)
    return response.status_code, response.content


def test_the_sandbox_answers_in_the_soap_response_envelope(soap_url: str) -> None:
    status, body = post_soap(soap_url)
    answer = read_soap_envelope("application/soap+xml", body)
    assert (status, answer["ErrorCode"], answer["PayloadType"]) == (
        200,
        "Success",
        "X12_271_Response_005010X279A1",
    )
    assert (answer["SenderID"], answer["ReceiverID"], answer["CORERuleVersion"]) == (
        "SBX01",
        "SECONDOPINION",
        "2.2.0",
    )
    assert parse_271(answer["Payload"]).traces == ("c-42",)


def test_the_sandbox_takes_no_login_in_the_body_and_no_envelope_without_a_token(soap_url: str) -> None:
    good = soap_request(
        build_270(INQUIRY),
        payload_id=str(uuid.uuid1()),
        login=CoreLogin.of(InsuranceSettings()),
        receiver_id="SBX01",
        at=datetime.now(UTC),
    ).decode()
    in_body = good.replace("<SenderID>", "<UserName>secondopinion</UserName><SenderID>")
    status, body = post_soap(soap_url, body=in_body.encode())
    assert status == 400 and b"env:Sender" in body and b"UserName" in body
    head, rest = good.split("<soap:Header>", 1)
    without_token = (head + rest.split("</soap:Header>", 1)[1]).encode()
    status, body = post_soap(soap_url, body=without_token)
    assert status == 400 and b"wsse:InvalidSecurity" in body
