"""The TLS side of a CORE POST: our client context (the X.509 login, the payers' CA bundle) and what a failed
handshake means.

A payer's TLS server refuses a handshake with an alert, and one alert means two things. Under TLS 1.2 a
server that requires a client certificate and gets none sends `handshake_failure` (TLS 1.3 has
`certificate_required` for it), and a server that shares no protocol version or cipher suite with us sends
the same `handshake_failure` before it has said anything else. The alert alone cannot tell a refused login
from a mismatch no login would mend, so `Handshake` watches what the server sent before it: a
CertificateRequest means it wanted a certificate. Python's ssl shows that only through
`SSLContext._msg_callback` (private, present since 3.8); where it is missing, the detail names both
possibilities. Neither is retried: a mismatch does not mend itself either::

    a certificate alert (certificate_required, unknown_ca, ...)   CoreLoginRefused: our X.509 login, or none
    handshake_failure after the server asked for a certificate    CoreLoginRefused
    handshake_failure before it asked; protocol_version,          CoreTlsRefused: no TLS version or cipher
      insufficient_security; our side refusing its version         suite in common
    handshake_failure where the handshake cannot be seen          CoreTlsRefused naming both causes
    a server certificate we do not trust                          CoreLoginUnusable: INSURANCE_CORE_CA_BUNDLE
    anything else (internal_error, a reset, ...)                  None: a transport failure, retried
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from services.insurance.core import CoreLogin, CoreLoginRefused, CoreLoginUnusable, CoreTlsRefused

# TLS alerts with which a server refuses the client's certificate (or its absence).
CERTIFICATE_ALERTS = (
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)
HANDSHAKE_FAILURE = "ALERT_HANDSHAKE_FAILURE"
# The server, or our side (OpenSSL's reasons), refusing the protocol version or the ciphers the other offers.
MISMATCHES = (
    "ALERT_PROTOCOL_VERSION",
    "ALERT_INSUFFICIENT_SECURITY",
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "NO_CIPHERS_AVAILABLE",
    "WRONG_CIPHER_RETURNED",
)
HANDSHAKE, CERTIFICATE_REQUEST = 22, 13  # the TLS record content type, and the handshake message type
MISMATCH = "we share no TLS version or cipher suite, which is not a CAQH CORE login problem"
MISMATCH_ADVICE = (
    "ask the payer which TLS versions and cipher suites its CORE endpoint takes (we offer TLS 1.2 and 1.3 "
    "with Python's default suites), and check its endpoint_url in insurance_payers"
)


@dataclass
class Handshake:
    """What a payer's TLS server sent before the handshake ended, as far as this Python lets us see."""

    watched: bool = False
    certificate_requested: bool = False

    def watch(self, context: ssl.SSLContext) -> None:
        if hasattr(context, "_msg_callback"):
            setattr(context, "_msg_callback", self._message)  # noqa: B010 - private: no stub for it
            self.watched = True

    def _message(
        self, _conn: Any, direction: str, _version: Any, kind: int, message: int, _data: Any
    ) -> None:
        if direction == "read" and kind == HANDSHAKE and message == CERTIFICATE_REQUEST:
            self.certificate_requested = True


def client_context(login: CoreLogin, handshake: Handshake) -> ssl.SSLContext:
    """Our TLS client context: payers' certificates checked against the CA bundle, or the system's trust store
    when none is set (for a password login as for an X.509 one: the operator's store, not one bundled with a
    library), and our certificate for an X.509 login; `handshake` watches what the server sends."""
    try:
        context = ssl.create_default_context(cafile=login.ca_bundle or None)
    except (OSError, ssl.SSLError) as exc:
        raise CoreLoginUnusable(
            f"the CA bundle for payers' certificates cannot be loaded ({type(exc).__name__}); check "
            "INSURANCE_CORE_CA_BUNDLE (a PEM file)"
        ) from None
    if login.x509:
        try:
            context.load_cert_chain(login.client_cert, login.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise CoreLoginUnusable(
                f"our X.509 login cannot be used: the client certificate or its key cannot be read, or "
                f"they do not belong together ({type(exc).__name__}); check {login.settings_named}"
            ) from None
    handshake.watch(context)
    return context


def tls_refusal(exc: BaseException, login: CoreLogin, handshake: Handshake) -> Exception | None:
    """What a TLS failure of the POST means (see the module's table); None: a transport failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return CoreLoginUnusable(
                "the payer's server certificate is not trusted (" + _token(seen.verify_message) + "); check "
                "INSURANCE_CORE_CA_BUNDLE (or the payer's endpoint_url)"
            )
        if isinstance(seen, ssl.SSLError):
            reason = _token(str(seen.reason or ""))
            if any(alert in reason for alert in CERTIFICATE_ALERTS):
                return _login_refused(f"TLS {reason}", login)
            if HANDSHAKE_FAILURE in reason:
                return _handshake_failure(reason, login, handshake)
            if any(mismatch in reason for mismatch in MISMATCHES):
                return CoreTlsRefused(f"TLS {reason}: {MISMATCH}; {MISMATCH_ADVICE}")
        seen = seen.__cause__ or seen.__context__
    return None


def _handshake_failure(reason: str, login: CoreLogin, handshake: Handshake) -> Exception:
    if handshake.certificate_requested:
        ours = "our client certificate" if login.x509 else "a client certificate, and we have none"
        return _login_refused(f"TLS {reason} after it asked for {ours}", login)
    if handshake.watched:
        return CoreTlsRefused(
            f"TLS {reason} before it asked for any certificate: {MISMATCH}; {MISMATCH_ADVICE}"
        )
    return CoreTlsRefused(
        f"TLS {reason}, and this Python cannot see at which step: either it wants a client certificate we "
        f"did not present or does not take ours (check {login.settings_named}; the payer may require an "
        f"X.509 login), or we share no TLS version or cipher suite ({MISMATCH_ADVICE})"
    )


def _login_refused(said: str, login: CoreLogin) -> CoreLoginRefused:
    if login.x509:
        return CoreLoginRefused(said)
    return CoreLoginRefused(
        f"{said}; the payer may require an X.509 login: INSURANCE_CORE_CLIENT_CERT and _KEY, or its own in "
        "INSURANCE_CORE_LOGINS"
    )


def _token(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in " _-.")[:80]
