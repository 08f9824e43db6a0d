"""What a failed TLS handshake with a payer means (services/insurance/core_tls.py): a refused login only when
the alert is about a certificate, or the server asked for one before it sent handshake_failure; a version or
cipher mismatch otherwise. The handshakes themselves, against the payer sandbox process, are in
tests/integration/test_insurance_core_tls.py."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import httpx
import pytest

from services.insurance.core import CoreLogin, CoreLoginRefused, CoreTlsRefused
from services.insurance.core_tls import Handshake, client_context, tls_refusal
from tests.pki import Authority

PASSWORD = CoreLogin("reading-group", "s3cret-Pa55word", "SECONDOPINION")
X509 = CoreLogin("", "", "SECONDOPINION", "/secrets/ours.crt", "/secrets/ours.key")


def refused(reason: str) -> httpx.ConnectError:
    alert = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    alert.reason = reason
    error = httpx.ConnectError("handshake failed")
    error.__cause__ = alert
    return error


@pytest.mark.parametrize(
    ("reason", "login", "handshake", "meaning", "said"),
    [
        (
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            PASSWORD,
            Handshake(True),
            CoreLoginRefused,
            "may require an X.509",
        ),
        (
            "TLSV1_ALERT_UNKNOWN_CA",
            X509,
            Handshake(True, True),
            CoreLoginRefused,
            "TLS TLSV1_ALERT_UNKNOWN_CA",
        ),
        ("SSLV3_ALERT_BAD_CERTIFICATE", X509, Handshake(True, True), CoreLoginRefused, "BAD_CERTIFICATE"),
        (
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
            PASSWORD,
            Handshake(watched=True, certificate_requested=True),
            CoreLoginRefused,
            "after it asked for a client certificate, and we have none; the payer may require an X.509 login",
        ),
        (
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
            X509,
            Handshake(watched=True, certificate_requested=True),
            CoreLoginRefused,
            "after it asked for our client certificate",
        ),
        (
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
            X509,
            Handshake(watched=True),
            CoreTlsRefused,
            "before it asked for any certificate: we share no TLS version or cipher suite",
        ),
        (
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
            X509,
            Handshake(watched=False),
            CoreTlsRefused,
            "cannot see at which step: either it wants a client certificate we did not present or does not "
            "take ours (check the client certificate and key",
        ),
        ("TLSV1_ALERT_PROTOCOL_VERSION", X509, Handshake(True), CoreTlsRefused, "share no TLS version"),
        (
            "TLSV1_ALERT_INSUFFICIENT_SECURITY",
            PASSWORD,
            Handshake(True),
            CoreTlsRefused,
            "share no TLS version",
        ),
        ("UNSUPPORTED_PROTOCOL", PASSWORD, Handshake(True), CoreTlsRefused, "share no TLS version"),
        ("TLSV1_ALERT_INTERNAL_ERROR", X509, Handshake(True, True), type(None), ""),  # retried as transport
    ],
    ids=[
        "certificate-required",
        "unknown-ca",
        "bad-certificate",
        "handshake-failure-after-a-certificate-request-none-sent",
        "handshake-failure-after-a-certificate-request-ours-sent",
        "handshake-failure-before-any-certificate-request",
        "handshake-failure-unseen",
        "protocol-version",
        "insufficient-security",
        "our-side-refusing-the-version",
        "internal-error",
    ],
)
def test_what_a_refused_handshake_means(
    reason: str, login: CoreLogin, handshake: Handshake, meaning: type, said: str
) -> None:
    refusal = tls_refusal(refused(reason), login, handshake)
    assert type(refusal) is meaning
    assert said in str(refusal)


def test_a_context_of_ours_is_watched_and_sees_a_certificate_request() -> None:
    handshake = Handshake()
    context = ssl.create_default_context()
    handshake.watch(context)
    assert handshake.watched  # this Python's ssl shows the handshake's messages
    callback = context._msg_callback  # type: ignore[attr-defined]
    callback(None, "read", ssl.TLSVersion.TLSv1_2, 22, 2, b"")  # ServerHello
    assert not handshake.certificate_requested
    callback(None, "write", ssl.TLSVersion.TLSv1_2, 22, 13, b"")  # ours, not the server's
    assert not handshake.certificate_requested
    callback(None, "read", ssl.TLSVersion.TLSv1_2, 22, 13, b"")  # CertificateRequest
    assert handshake.certificate_requested


def test_without_a_ca_bundle_both_logins_trust_the_systems_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's trust store (OpenSSL's: the CAs installed on the host, or the file SSL_CERT_FILE names, as
    the prod overlay does), not the certifi bundle shipped with httpx, for a password login as for an X.509 one."""
    authority = Authority(tmp_path, "hospital-trust")
    ours = authority.issue("SECONDOPINION")
    logins = (PASSWORD, dataclasses.replace(X509, client_cert=str(ours.cert), client_key=str(ours.key)))

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    system = sorted(c["serialNumber"] for c in ssl.create_default_context().get_ca_certs())
    for login in logins:  # the host's store (here, Debian's ca-certificates: not the same set as certifi's)
        assert sorted(c["serialNumber"] for c in client_context(login, Handshake()).get_ca_certs()) == system

    monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert))
    for login in logins:
        trusted = client_context(login, Handshake()).get_ca_certs()
        assert [dict(item[0] for item in c["subject"]) for c in trusted] == [{"commonName": "hospital-trust"}]
