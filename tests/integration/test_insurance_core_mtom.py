"""A payer whose SOAP stack answers with MTOM (CAQH CORE Connectivity Rule vC2.2.0's SOAP form, SOAP 1.2 MTOM):
the payer sandbox process over HTTPS with `PAYER_SANDBOX_MTOM`, every answer a `multipart/related` XOP package
whose Payload is an xop:Include naming the part with the 271, through the insurance service's handler.

What an operator sees: the member covered as with an inline answer, a busy payer retried, a wrong password
`payer_rejected` naming the settings; never `malformed_response` for the packaging alone."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.insurance.core import CoreLogin
from services.insurance.core_soap import CONTENT_TYPE, soap_request
from services.insurance.settings import InsuranceSettings
from services.insurance.x12 import build_270
from tests.integration.test_insurance_x12 import subscriber, verify
from tests.payer_sandbox.process import running_sandbox, sandbox_payer
from tests.pki import Authority
from tests.unit.test_insurance_x12 import INQUIRY


@pytest.fixture(scope="module")
def payer_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The payer's CA certificate, and the sandbox's HTTPS SOAP endpoint (MTOM on) its certificate is from."""
    authority = Authority(tmp_path_factory.mktemp("pki"), "payer")
    server = authority.issue("payer.example", server=True)
    env = {
        "PAYER_SANDBOX_TLS_CERT": str(server.cert),
        "PAYER_SANDBOX_TLS_KEY": str(server.key),
        "PAYER_SANDBOX_MTOM": "1",
    }
    with running_sandbox(env) as port:
        yield authority.cert, f"https://127.0.0.1:{port}/core/soap"


@pytest.fixture(scope="module")
def engine(settings: Settings, payer_ca: tuple[Path, str]) -> Iterator[Engine]:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    with sandbox_payer(engine, payer_ca[1], "soap"):
        yield engine


def over_https(payer_ca: tuple[Path, str], **overrides: object) -> InsuranceSettings:
    values: dict[str, object] = {
        "payer_attempts": 3,
        "payer_backoff_seconds": 0.05,
        "core_ca_bundle": str(payer_ca[0]),
        **overrides,
    }
    return InsuranceSettings.model_validate(values)


def test_the_sandbox_answers_in_an_mtom_package_with_the_271_in_a_part(payer_ca: tuple[Path, str]) -> None:
    request = soap_request(
        build_270(INQUIRY),
        payload_id=str(uuid.uuid1()),
        login=CoreLogin.of(InsuranceSettings()),
        receiver_id="SBX01",
        at=datetime.now(UTC),
    )
    with httpx.Client(verify=ssl.create_default_context(cafile=payer_ca[0])) as client:
        answer = client.post(payer_ca[1], content=request, headers={"Content-Type": CONTENT_TYPE})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith('multipart/related; type="application/xop+xml"')
    assert b"<Payload><xop:Include " in answer.content and b'href="cid:payload%2F' in answer.content
    assert b"\r\nISA*" in answer.content  # the 271 as it is, in a part of its own


@pytest.mark.parametrize(
    ("member", "status", "outcome", "cost", "said"),
    [
        ("SBX-MET", "covered", "active", "68.00", ""),
        ("SBX-PARTLY", "covered", "active", "108.00", ""),
        ("NO-SUCH-MEMBER", "not_covered", "member_mismatch", "350.00", "AAA 75"),
    ],
)
def test_an_mtom_answer_over_https_is_read_like_an_inline_one(
    engine: Engine,
    settings: Settings,
    payer_ca: tuple[Path, str],
    member: str,
    status: str,
    outcome: str,
    cost: str,
    said: str,
) -> None:
    verified = verify(engine, "SBX-PPO", member, settings, config=over_https(payer_ca))
    assert (verified.coverage_status, verified.outcome, verified.patient_cost) == (
        status,
        outcome,
        Decimal(cost),
    )
    assert said in verified.explanation
    assert member not in verified.explanation


def test_a_busy_fault_in_an_mtom_package_is_retried(
    engine: Engine, settings: Settings, payer_ca: tuple[Path, str]
) -> None:
    # SBX-CORE-BUSY's first two inquiries get a SOAP Fault env:Receiver, here inside an MTOM package.
    with capture_logs() as logs:
        verified = verify(engine, "SBX-PPO", "SBX-CORE-BUSY", settings, config=over_https(payer_ca))
    assert (verified.coverage_status, verified.outcome) == ("covered", "active")
    assert [e["reason"] for e in logs if e["event"] == "payer.busy"] == ["SOAP Fault Receiver Busy"] * 2


def test_a_wrong_password_in_an_mtom_answer_is_payer_rejected_naming_the_settings(
    engine: Engine, settings: Settings, payer_ca: tuple[Path, str]
) -> None:
    wrong = over_https(payer_ca, core_password="not-the-Sandbox-pw")
    verified = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=wrong)
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_rejected")
    assert "refused our CAQH CORE login (SOAP Fault Sender FailedAuthentication)" in verified.explanation
    assert "INSURANCE_CORE_PASSWORD" in verified.explanation
    assert "not-the-Sandbox-pw" not in verified.explanation and "Tester" not in verified.explanation
