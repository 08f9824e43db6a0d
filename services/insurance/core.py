"""CAQH CORE Connectivity Rule vC2.2.0, HTTP MIME multipart form: the envelope a real-time 270 travels in.

A `multipart/form-data` POST with PayloadType, ProcessingMode `RealTime`, PayloadID (a UUID), TimeStamp,
UserName, Password, SenderID, ReceiverID, CORERuleVersion and the X12 as Payload; the answer comes back in
the same envelope, echoing the PayloadID, with ErrorCode `Success` (or why not). We log in with either of the
rule's two submitter authentication standards (§4.1), as a client must support both: UserName + Password in
the envelope, or an X.509 client certificate in the TLS handshake (then the envelope carries no UserName or
Password). Each payer may have a login of its own (`INSURANCE_CORE_LOGINS`). The rule's other envelope
standard, SOAP 1.2 + WSDL, is `core_soap`: the same fields and the same checks of the answer
(`core_answer`), chosen per payer (`insurance_payers.core_envelope`). Nothing here logs; the password shows
in no repr, and of what a payer sends only plain tokens (ErrorCode, PayloadType) may reach a message.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage

from services.insurance.settings import CoreLoginSetting, InsuranceSettings

CORE_RULE_VERSION = "2.2.0"
REQUEST_TYPE = "X12_270_Request_005010X279A1"
# What may answer a real-time 270: the 271, or the 999 / TA1 with which the payer refuses the 270 itself.
ANSWER_TYPES = {
    "X12_271_Response_005010X279A1",
    "X12_999_Response_005010X231A1",
    "X12_TA1_Response_00501X231A1",
}
# CORE envelope ErrorCodes: our login (or our sender / receiver pair) refused, and "try again later".
LOGIN_ERRORS = {"UnAuthorized", "Sender/ReceiverNotAuthorized"}
TRANSIENT_ERRORS = {"Busy"}
ENVELOPE_FIELDS = (
    "PayloadType",
    "ProcessingMode",
    "PayloadID",
    "TimeStamp",
    "UserName",
    "Password",
    "SenderID",
    "ReceiverID",
    "CORERuleVersion",
    "Checksum",
    "Payload",
    "ErrorCode",
    "ErrorMessage",
)
_CANONICAL = {name.lower(): name for name in ENVELOPE_FIELDS}
_CODE = re.compile(r"[A-Za-z0-9_./-]{1,60}")  # what of a payer's envelope value may be shown in a detail


class PayerBusy(Exception):
    """A failure worth retrying: the payer did not answer, or answered "try again later"."""


class CoreRefused(Exception):
    """The payer's CORE server refused our envelope; the ErrorCode (or HTTP status) says why."""


class CoreLoginRefused(CoreRefused):
    """The payer's CORE server refused our UserName / Password or our SenderID / ReceiverID pair."""


class CoreLoginUnusable(Exception):
    """Our side of the TLS login cannot be used (files, trust): nothing was sent, a setting must be fixed."""


class CoreTlsRefused(Exception):
    """The payer's TLS server refused our handshake for want of a TLS version or cipher suite in common (or for
    a reason this Python cannot see): the 270 was not sent, and sending it again would not mend it."""


class CoreEnvelopeInvalid(Exception):
    """An answer that is not a CORE envelope answering our request."""


@dataclass(frozen=True)
class CoreLogin:
    """Who we are to a payer's CORE server. The password never shows in a repr.

    With `client_cert` (and `client_key`), the X.509 login: the certificate is presented in the TLS
    handshake and the envelope carries no UserName or Password. Without, UserName + Password."""

    username: str
    password: str = field(repr=False)
    sender_id: str
    client_cert: str = ""
    client_key: str = ""
    ca_bundle: str = ""  # the payers' server certificates are checked against it ("": the system's)

    @property
    def x509(self) -> bool:
        return bool(self.client_cert)

    @property
    def settings_named(self) -> str:
        """The settings an operator checks when this login is refused (never their values)."""
        if self.x509:
            return (
                "the client certificate and key (INSURANCE_CORE_CLIENT_CERT / _KEY or INSURANCE_CORE_LOGINS)"
            )
        return "INSURANCE_CORE_USERNAME, INSURANCE_CORE_PASSWORD and INSURANCE_CORE_SENDER_ID (or INSURANCE_CORE_LOGINS)"

    @classmethod
    def of(cls, settings: InsuranceSettings, payer_id: str | None = None) -> CoreLogin:
        """The login for a payer: its own entry in `core_logins`, the rest from the default login."""
        default = cls(
            settings.core_username,
            settings.core_password.get_secret_value(),
            settings.core_sender_id,
            settings.core_client_cert,
            settings.core_client_key,
            settings.core_ca_bundle,
        )
        own = settings.core_logins.get(payer_id or "")
        return default if own is None else default._with(own)

    def _with(self, own: CoreLoginSetting) -> CoreLogin:
        if own.client_cert or own.client_key:  # this payer takes a certificate
            cert, key = own.client_cert or "", own.client_key or ""
        elif own.username is not None or own.password is not None:  # this payer takes a password
            cert, key = "", ""
        else:
            cert, key = self.client_cert, self.client_key
        return CoreLogin(
            own.username if own.username is not None else self.username,
            own.password.get_secret_value() if own.password is not None else self.password,
            own.sender_id or self.sender_id,
            cert,
            key,
            own.ca_bundle if own.ca_bundle is not None else self.ca_bundle,
        )


def core_request(
    payload: str, *, payload_id: str, login: CoreLogin, receiver_id: str, at: datetime
) -> dict[str, str]:
    """The fields of a CORE real-time request envelope, in the rule's order."""
    return {
        "PayloadType": REQUEST_TYPE,
        "ProcessingMode": "RealTime",
        "PayloadID": payload_id,
        "TimeStamp": at.isoformat(timespec="seconds"),
        **({} if login.x509 else {"UserName": login.username, "Password": login.password}),
        "SenderID": login.sender_id,
        "ReceiverID": receiver_id,
        "CORERuleVersion": CORE_RULE_VERSION,
        "Payload": payload,
    }


def read_envelope(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a CORE MIME multipart envelope, names matched without regard to case."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not media_type.startswith("multipart/"):
        raise CoreEnvelopeInvalid(f"the answer is {_shown(media_type) or 'untyped'}, not MIME multipart")
    message = mime_message(content_type, body)
    try:
        fields: dict[str, str] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, tuple):
                name = email.utils.collapse_rfc2231_value(name)
            if not isinstance(name, str) or not name:
                continue
            name = _CANONICAL.get(name.lower(), name)
            if name in fields:
                raise CoreEnvelopeInvalid(f"the field {_shown(name)} comes twice")
            value = part.get_payload(decode=True)
            fields[name] = value.decode("utf-8") if isinstance(value, bytes) else ""
    except (ValueError, LookupError, email.errors.MessageError) as exc:
        raise CoreEnvelopeInvalid(f"its multipart body cannot be read ({type(exc).__name__})") from exc
    return fields


def mime_message(content_type: str, body: bytes) -> EmailMessage:
    """A MIME multipart body (sent with `content_type`) parsed whole, its parts one level down; the CORE MIME
    envelope and an MTOM package (`core_xop`) are both read with it."""
    try:
        head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
        message = email.message_from_bytes(head + body, _class=EmailMessage, policy=email.policy.HTTP)
    except (ValueError, LookupError, email.errors.MessageError) as exc:
        raise CoreEnvelopeInvalid(f"its multipart body cannot be read ({type(exc).__name__})") from exc
    if not message.is_multipart() or message.defects:
        raise CoreEnvelopeInvalid("its multipart body is cut short or has no parts")
    return message


def core_answer(fields: dict[str, str], payload_id: str) -> str:
    """The X12 an answer envelope carries, once its ErrorCode, PayloadID echo and PayloadType are checked."""
    code = fields.get("ErrorCode", "")
    if not code:
        raise CoreEnvelopeInvalid("the envelope has no ErrorCode")
    if code != "Success":
        shown = _shown(code) or "an unreadable ErrorCode"
        if code in LOGIN_ERRORS:
            raise CoreLoginRefused(shown)
        if code in TRANSIENT_ERRORS:
            raise PayerBusy(f"CORE {shown}")
        raise CoreRefused(shown)
    if fields.get("PayloadID") != payload_id:
        raise CoreEnvelopeInvalid("its PayloadID is not the one we sent, so it answers another request")
    payload_type = fields.get("PayloadType", "")
    if payload_type not in ANSWER_TYPES:
        raise CoreEnvelopeInvalid(
            f"its PayloadType is {_shown(payload_type) or 'missing'}, not a 271, 999 or TA1"
        )
    if not fields.get("Payload", "").strip():
        raise CoreEnvelopeInvalid("it carries no Payload")
    return fields["Payload"]


def answer_payload(status: int, content_type: str, body: bytes, payload_id: str) -> str:
    """The X12 of a payer's HTTP answer: its envelope decides, the status only where there is none."""
    if status >= 500:
        raise PayerBusy(f"HTTP {status}")
    try:
        fields = read_envelope(content_type, body)
    except CoreEnvelopeInvalid:
        if status in {401, 403}:
            raise CoreLoginRefused(f"HTTP {status}") from None
        if status != 200:
            raise CoreEnvelopeInvalid(f"HTTP {status} without a CORE envelope") from None
        raise
    if status != 200 and fields.get("ErrorCode") == "Success":
        raise CoreEnvelopeInvalid(f"HTTP {status} with ErrorCode Success")
    return core_answer(fields, payload_id)


def _shown(value: str) -> str:
    """A payer-sent code as it may appear in a detail: a plain token, or nothing."""
    return value if _CODE.fullmatch(value) else ""
