"""DICOM over TLS (PS3.15 Annex B, the BCP 195 secure transport connection profiles): the TLS contexts of
our DIMSE associations, built on the standard library's `ssl` and handed to pynetdicom (`tls_args` when we
request an association, `ssl_context` for our C-STORE SCP).

TLS 1.2 at least, the peer's certificate verified against a CA bundle we are given, its name checked
(the source's `tls_server_name`, else its host), and our own certificate presented when we have one (most
PACS require mutual TLS). A handshake that fails is described for a PACS administrator: which side refused,
and why (`describe`); never with a key or a certificate's contents. A port and a TLS setting that do not match
are told apart from a refusal: TLS to a plain port ends in the peer closing the connection (or a record that is
not TLS) during the handshake; plain DIMSE to a TLS-only port is confirmed by one ClientHello (`answers_tls`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
# BCP 195: nothing older, on every DIMSE link either way.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsFilesUnusable(ValueError):
    """A certificate, key or CA bundle that is missing, unreadable or not what it should be."""


@dataclass(frozen=True)
class ClientTls:
    """How we connect to a facility's PACS over TLS."""

    ca_path: str
    cert_path: str | None = None
    key_path: str | None = None
    server_name: str | None = None  # checked against the PACS's certificate; the host when None

    def context(self) -> ssl.SSLContext:
        context = _WatchedContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = MINIMUM_VERSION
        _load(context.load_verify_locations, "the CA bundle", self.ca_path)
        if self.cert_path and self.key_path:
            _load_pair(context, self.cert_path, self.key_path)
        return context


def missing_settings(ca_path: str | None, cert_path: str | None, key_path: str | None) -> list[str]:
    """What a TLS source lacks before its files can even be looked at (empty when nothing)."""
    problems = []
    if not ca_path:
        problems.append("tls_ca_path is required with tls (the CA bundle that signed the PACS's certificate)")
    if bool(cert_path) != bool(key_path):
        problems.append("tls_cert_path and tls_key_path go together (our client certificate and its key)")
    return problems


def within(directory: Path, field: str, path: str) -> str:
    """`path` (relative to `directory`, or absolute inside it) as a file the records service may read: TLS
    files are only read from the directory operations keep them in, so a source cannot name any other."""
    resolved = (directory / path).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise TlsFilesUnusable(
            f"{field} must name a file in the records service's DICOM TLS directory (RECORDS_DICOM_TLS_DIR), "
            "where operations place each PACS's CA bundle and our certificates; a relative path is read there"
        )
    return str(resolved)


def server_context(cert_path: Path, key_path: Path, client_ca_path: Path | None) -> ssl.SSLContext:
    """Our SCP's TLS context; with `client_ca_path` a client must present a certificate that CA signed."""
    context = _WatchedContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_pair(context, str(cert_path), str(key_path))
    if client_ca_path is not None:
        _load(context.load_verify_locations, "the client CA bundle", str(client_ca_path))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_pair(context: ssl.SSLContext, cert_path: str, key_path: str) -> None:
    for what, path in (("the certificate", cert_path), ("the private key", key_path)):
        _readable(what, path)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError:
        raise TlsFilesUnusable(
            f"the certificate {cert_path} and the private key {key_path} could not be loaded together "
            "(PEM files, the key unencrypted and matching the certificate)"
        ) from None


def _load(load: Any, what: str, path: str) -> None:
    _readable(what, path)
    try:
        load(path)
    except ssl.SSLError:
        raise TlsFilesUnusable(f"{what} {path} holds no PEM certificate") from None


def _readable(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise TlsFilesUnusable(f"{what} {path} does not exist (a PEM file in RECORDS_DICOM_TLS_DIR)")
    if not os.access(path, os.R_OK):
        raise TlsFilesUnusable(f"{what} {path} cannot be read by the records service (check its permissions)")


def is_loopback(host: str) -> bool:
    """A peer on this machine (plain DIMSE to it never crosses a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _WatchedSocket(ssl.SSLSocket):
    """An SSL socket that notes the first TLS error on its context (pynetdicom only logs it, and aborts): an
    SSL error, or the connection closed or reset during the handshake (a peer that does not speak TLS)."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            _note(self, exc)
            raise

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # ssl.SSLError included
            _note(self, exc)
            raise

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)
        except ssl.SSLError as exc:
            _note(self, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            _note(self, exc)
            raise


class _WatchedContext(ssl.SSLContext):
    sslsocket_class = _WatchedSocket
    failure: OSError | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        if server_side:
            # The handshake runs on the association's own thread at its first read, not in the accept loop
            # (pynetdicom wraps there), so a client that never finishes it holds up no one else.
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)


def _note(sock: ssl.SSLSocket, exc: OSError) -> None:
    context = sock.context
    if not isinstance(context, _WatchedContext):
        return
    if _is_server(context):  # one context for every association our SCP accepts: logged, not kept
        if sock.version() is None:  # the handshake did not complete: a client refused, or refusing us
            log.warning("records.scp_tls_refused", reason=describe(exc, we_are_client=False))
        else:
            log.warning("records.scp_tls_error", reason=getattr(exc, "reason", None) or type(exc).__name__)
        return
    if context.failure is None:
        context.failure = exc


def _is_server(context: ssl.SSLContext) -> bool:
    return context.protocol == ssl.PROTOCOL_TLS_SERVER


def failure(context: ssl.SSLContext | None) -> OSError | None:
    """The TLS error that ended the last connection made with `context` (a client's, one per association)."""
    return context.failure if isinstance(context, _WatchedContext) else None


def answers_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the peer at `host`:`port` answers a TLS ClientHello in TLS (a handshake, or a TLS alert):
    asked when plain DIMSE got no association, to tell a port that speaks only TLS from a PACS that refused.
    Nothing is verified and nothing is sent after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "").upper()  # a TLS peer refusing us (a client certificate it wants)
    except (OSError, ValueError):
        return False


def _not_tls(we_are_client: bool, why: str) -> str:
    if we_are_client:
        return f"the PACS does not speak TLS on this port: check the port or turn tls off ({why})"
    return f"the client does not speak TLS on this port ({why}): it should turn TLS on or use our plain port"


def describe(exc: OSError, *, we_are_client: bool) -> str:
    """Which side refused the TLS handshake and why, as a PACS administrator can act on it."""
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError):
        # Closed or reset during the handshake, no TLS alert: a DICOM peer on a plain port drops a ClientHello
        # (not a PDU it knows).
        return _not_tls(we_are_client, "it closed the connection during the TLS handshake")
    reason = (exc.reason or "").upper()
    peer = "the PACS" if we_are_client else "the client"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or "not verified"
        peer = "the PACS's" if we_are_client else "the client's"
        if "HOSTNAME" in detail.upper() or "IP ADDRESS MISMATCH" in detail.upper():
            return f"we refused {peer} certificate: it does not name the server name we checked ({detail})"
        return f"we refused {peer} certificate: not trusted by the CA bundle configured ({detail})"
    if "CERTIFICATE_REQUIRED" in reason and we_are_client:
        return f"{peer} refused us: it requires a client certificate (set tls_cert_path and tls_key_path)"
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return "we refused the client: it presented no certificate, and our TLS SCP requires one"
    if any(alert in reason for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        if we_are_client:
            return f"{peer} refused our client certificate ({exc.reason}): it does not trust the CA that signed it"
        return f"the client refused our certificate ({exc.reason}): it does not trust the CA that signed it"
    if "WRONG_VERSION_NUMBER" in reason or "PACKET_LENGTH_TOO_LONG" in reason or "HTTP_REQUEST" in reason:
        return _not_tls(we_are_client, str(exc.reason))
    if "UNSUPPORTED_PROTOCOL" in reason or "VERSION" in reason:
        return f"no TLS version both sides allow ({exc.reason}); at least TLS 1.2 is required"
    return f"the TLS handshake with {peer} failed ({exc.reason or type(exc).__name__})"
