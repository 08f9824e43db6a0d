"""CAQH CORE's X.509 login (Connectivity Rule vC2.2.0 §4.1: a client must support both standards), and a login
of its own per payer: the payer sandbox over HTTPS with mutual TLS, the insurance service's handler as client.

What an operator checks: with the certificate the clearinghouse issued, the member is covered; with anything
else (no certificate, a certificate of another CA, an untrusted payer certificate, a key file that cannot be
read) the case gets `payer_rejected` with a detail naming the settings to fix, never a dead letter. A payer
whose TLS server shares no version or cipher suite with ours is `payer_rejected` too, but neither retried nor
called a login problem, even though under TLS 1.2 its alert (handshake_failure) is the one a missing client
certificate gets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from structlog.testing import capture_logs

from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.insurance.models import InsurancePayer
from services.insurance.settings import CoreLoginSetting, InsuranceSettings
from tests.integration.test_insurance_x12 import subscriber, verify
from tests.payer_sandbox.process import running_sandbox, sandbox_payer
from tests.pki import Authority, Issued

CLIENT = "secondopinion-reading-group"  # the subject the sandbox takes as a login (members.json)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | Issued]:
    folder = tmp_path_factory.mktemp("pki")
    payer_ca, ours, rogue = (
        Authority(folder, "payer"),
        Authority(folder, "clearinghouse"),
        Authority(folder, "rogue"),
    )
    return {
        "payer_ca": payer_ca.cert,
        "server": payer_ca.issue("payer.example", server=True),
        "client_ca": ours.cert,
        "client": ours.issue(CLIENT),
        "stranger": ours.issue("someone-else"),
        "rogue": rogue.issue(CLIENT),
    }


@pytest.fixture(scope="module")
def sandbox(pki: dict[str, Path | Issued]) -> Iterator[str]:
    server = pki["server"]
    assert isinstance(server, Issued)
    env = {
        "PAYER_SANDBOX_TLS_CERT": str(server.cert),
        "PAYER_SANDBOX_TLS_KEY": str(server.key),
        "PAYER_SANDBOX_CLIENT_CA": str(pki["client_ca"]),
    }
    with running_sandbox(env) as port:
        yield f"https://127.0.0.1:{port}/core/eligibility"


@pytest.fixture(scope="module")
def engine(settings: Settings, sandbox: str) -> Iterator[Engine]:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    with sandbox_payer(engine, sandbox):
        yield engine


def x509(pki: dict[str, Path | Issued], client: str = "client", **overrides: object) -> InsuranceSettings:
    issued = pki[client]
    assert isinstance(issued, Issued)
    values: dict[str, object] = {
        "payer_attempts": 2,
        "payer_backoff_seconds": 0.05,
        "core_client_cert": str(issued.cert),
        "core_client_key": str(issued.key),
        "core_ca_bundle": str(pki["payer_ca"]),
        **overrides,
    }
    return InsuranceSettings.model_validate(values)


def test_the_x509_login_is_accepted_and_sends_no_password(
    engine: Engine, settings: Settings, pki: dict[str, Path | Issued]
) -> None:
    # The default password is deliberately wrong: with a certificate, the envelope carries none at all.
    config = x509(pki, core_password="not-the-Sandbox-pw", core_username="nobody")
    verified = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=config)
    assert (verified.coverage_status, verified.outcome, verified.network) == ("covered", "active", "in")


def test_a_payer_of_its_own_login_gets_it_and_the_others_keep_the_default(
    engine: Engine, settings: Settings, pki: dict[str, Path | Issued]
) -> None:
    client = pki["client"]
    assert isinstance(client, Issued)
    # The default login is a password (refused over this mutual-TLS endpoint); SBX01 has a certificate of its own.
    own = CoreLoginSetting(client_cert=str(client.cert), client_key=str(client.key))
    config = InsuranceSettings(
        payer_attempts=2,
        payer_backoff_seconds=0.05,
        core_ca_bundle=str(pki["payer_ca"]),
        core_logins={"SBX01": own},
    )
    assert verify(engine, "SBX-PPO", "SBX-MET", settings, config=config).coverage_status == "covered"
    other = InsuranceSettings(
        payer_attempts=2,
        payer_backoff_seconds=0.05,
        core_ca_bundle=str(pki["payer_ca"]),
        core_logins={"OTHER": own},
    )
    refused = verify(engine, "SBX-PPO", "SBX-MET", settings, config=other)
    assert (refused.coverage_status, refused.outcome) == ("not_covered", "payer_rejected")
    assert "may require an X.509 login" in refused.explanation


@pytest.mark.parametrize(
    ("client", "overrides", "said"),
    [
        # A certificate from a CA the payer does not trust: the handshake's alert says so.
        ("rogue", {}, "refused our CAQH CORE login (TLS"),
        # A certificate of the right CA whose subject is not a login for this payer: CORE UnAuthorized.
        ("stranger", {}, "refused our CAQH CORE login (UnAuthorized)"),
        # The payer's server certificate checked against the system's trust store, which does not know it.
        ("client", {"core_ca_bundle": ""}, "the payer's server certificate is not trusted"),
        # A key file that is not there: nothing is sent.
        ("client", {"core_client_key": "/nonexistent/clearinghouse.key"}, "was not sent"),
    ],
    ids=["certificate-of-another-ca", "unknown-subject", "untrusted-payer", "missing-key"],
)
def test_a_refused_or_unusable_x509_login_is_payer_rejected_and_names_the_settings(
    engine: Engine,
    settings: Settings,
    pki: dict[str, Path | Issued],
    client: str,
    overrides: dict[str, object],
    said: str,
) -> None:
    verified = verify(
        engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=x509(pki, client, **overrides)
    )
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_rejected")
    assert said in verified.explanation
    assert "INSURANCE_CORE_" in verified.explanation
    assert "SBX-MET" not in verified.explanation and "Tester" not in verified.explanation


def test_the_x509_login_over_soap_sends_no_username_token(
    engine: Engine, settings: Settings, pki: dict[str, Path | Issued]
) -> None:
    # The same mutual-TLS payer asked in the SOAP form: the certificate logs in, the Header carries no token
    # (the password is deliberately wrong, so a UsernameToken would be refused), and a stranger is refused.
    with Session(engine) as session:
        payer = session.get(InsurancePayer, "SBX01")
        assert payer is not None and payer.endpoint_url
        mime_url = payer.endpoint_url
        payer.endpoint_url, payer.core_envelope = mime_url.replace("/core/eligibility", "/core/soap"), "soap"
        session.add(payer)
        session.commit()
    try:
        config = x509(pki, core_password="not-the-Sandbox-pw")
        verified = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=config)
        assert (verified.coverage_status, verified.outcome) == ("covered", "active")
        stranger = verify(engine, "SBX-PPO", "SBX-MET", settings, config=x509(pki, "stranger"))
        assert (stranger.coverage_status, stranger.outcome) == ("not_covered", "payer_rejected")
        assert "refused our CAQH CORE login (SOAP Fault Sender FailedAuthentication)" in stranger.explanation
        assert "client certificate" in stranger.explanation
    finally:
        with Session(engine) as session:
            payer = session.get(InsurancePayer, "SBX01")
            assert payer is not None
            payer.endpoint_url, payer.core_envelope = mime_url, "mime"
            session.add(payer)
            session.commit()


@contextmanager
def payer_of_other_tls_habits(engine: Engine, pki: dict[str, Path | Issued], **env: str) -> Iterator[None]:
    """SBX01 pointed for a while at a sandbox process of its own (PAYER_SANDBOX_TLS_* as given)."""
    server = pki["server"]
    assert isinstance(server, Issued)
    tls = {"PAYER_SANDBOX_TLS_CERT": str(server.cert), "PAYER_SANDBOX_TLS_KEY": str(server.key), **env}
    with running_sandbox(tls) as port, sandbox_payer(engine, f"https://127.0.0.1:{port}/core/eligibility"):
        yield


def test_a_tls_12_payer_wanting_a_certificate_we_do_not_send_is_a_refused_login(
    engine: Engine, settings: Settings, pki: dict[str, Path | Issued]
) -> None:
    # Under TLS 1.2 a server that requires a client certificate and gets none says handshake_failure; it
    # asked for one first, so this is our login: the password login meets a payer that wants X.509.
    password_login = InsuranceSettings(
        payer_attempts=2, payer_backoff_seconds=0.05, core_ca_bundle=str(pki["payer_ca"])
    )
    client_ca = str(pki["client_ca"])
    with (
        payer_of_other_tls_habits(
            engine, pki, PAYER_SANDBOX_CLIENT_CA=client_ca, PAYER_SANDBOX_TLS_MAX_VERSION="TLSv1_2"
        ),
        capture_logs() as logs,
    ):
        refused = verify(engine, "SBX-PPO", "SBX-MET", settings, config=password_login)
        covered = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=x509(pki))
    assert (refused.coverage_status, refused.outcome) == ("not_covered", "payer_rejected")
    assert (
        "refused our CAQH CORE login (TLS SSLV3_ALERT_HANDSHAKE_FAILURE after it asked for a client "
        "certificate, and we have none; the payer may require an X.509 login: INSURANCE_CORE_CLIENT_CERT"
    ) in refused.explanation
    assert "INSURANCE_CORE_" in refused.explanation
    assert not [entry for entry in logs if entry["event"] == "payer.busy"]  # a refused login is not retried
    assert (covered.coverage_status, covered.outcome) == ("covered", "active")  # with the certificate


@pytest.mark.parametrize(
    "habits",
    [
        # No cipher suite in common (SHA-1 MACs, which our client does not offer): the server's first and
        # only word is handshake_failure, before it asks for any certificate. It wants one, too.
        {"PAYER_SANDBOX_TLS_MAX_VERSION": "TLSv1_2", "PAYER_SANDBOX_TLS_CIPHERS": "ECDHE-ECDSA-AES128-SHA"},
        # TLS 1.0 and 1.1 only, which our client does not speak: protocol_version.
        {
            "PAYER_SANDBOX_TLS_MIN_VERSION": "TLSv1",
            "PAYER_SANDBOX_TLS_MAX_VERSION": "TLSv1_1",
            "PAYER_SANDBOX_TLS_CIPHERS": "DEFAULT:@SECLEVEL=0",
        },
    ],
    ids=["no-common-cipher-suite", "no-common-tls-version"],
)
def test_a_payer_sharing_no_tls_version_or_cipher_suite_is_not_a_refused_login_nor_retried(
    engine: Engine, settings: Settings, pki: dict[str, Path | Issued], habits: dict[str, str]
) -> None:
    with (
        payer_of_other_tls_habits(engine, pki, PAYER_SANDBOX_CLIENT_CA=str(pki["client_ca"]), **habits),
        capture_logs() as logs,
    ):
        verified = verify(engine, "SBX-PPO", "SBX-MET", settings, subscriber("Tester"), config=x509(pki))
    assert (verified.coverage_status, verified.outcome) == ("not_covered", "payer_rejected")
    assert "was not sent, and not retried" in verified.explanation
    assert (
        "we share no TLS version or cipher suite, which is not a CAQH CORE login problem"
        in verified.explanation
    )
    assert (
        "ask the payer which TLS versions and cipher suites its CORE endpoint takes" in verified.explanation
    )
    assert "refused our CAQH CORE login" not in verified.explanation
    assert not [entry for entry in logs if entry["event"] == "payer.busy"]
    assert [entry["event"] for entry in logs if entry["event"].startswith("payer.")] == ["payer.tls_refused"]
