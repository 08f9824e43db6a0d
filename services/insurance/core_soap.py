"""CAQH CORE Connectivity Rule vC2.2.0, SOAP+WSDL form: the same real-time envelope as SOAP 1.2 document/literal.

A POST of `application/soap+xml; charset=utf-8; action="RealTimeTransaction"` (the CORE WSDL's
`RealTimeTransaction` operation, soap12 binding) whose Body is `COREEnvelopeRealTimeRequest` in the namespace
`http://www.caqh.org/SOAP/WSDL/CORERule2.2.0.xsd`, its children unqualified: PayloadType, ProcessingMode,
PayloadID, TimeStamp, SenderID, ReceiverID, CORERuleVersion, Payload (the 270 as text). The password login
travels in the Header as a WS-Security UsernameToken (Username, Password of type PasswordText, UsernameToken
Profile 1.0), never in the Body; the X.509 login is the TLS handshake's, and the Header carries no token.

The answer is `COREEnvelopeRealTimeResponse` (the request's fields plus ErrorCode and ErrorMessage), read with
`core.core_answer`'s checks, or a SOAP Fault. It comes as `application/soap+xml`, or, from a payer whose SOAP
stack speaks MTOM, as a `multipart/related` XOP package whose Payload may be an xop:Include naming the part that
holds the 271 (`core_xop`); what the envelope says counts the same either way::

    env:Sender + wsse:FailedAuthentication, InvalidSecurityToken, ... (or CORE UnAuthorized)
                                    CoreLoginRefused: our login, fix the settings
    env:Receiver (or CORE Busy)     PayerBusy: retried
    any other fault                 CoreRefused, naming its code only

Parsing is defusedxml's: no DTD, no entities, no external references, and an answer over `MAX_ANSWER_BYTES`
(an MTOM package counted whole) is not parsed at all. Of what a payer sends, only plain tokens (fault codes, ErrorCode) reach a message;
the fault's Reason text never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from xml.etree.ElementTree import Element  # noqa: S405 - typing only; parsing is defusedxml's
from xml.sax.saxutils import escape, quoteattr  # noqa: S406 - escaping what we write, not parsing

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from services.insurance.core import (
    ENVELOPE_FIELDS,
    LOGIN_ERRORS,
    TRANSIENT_ERRORS,
    CoreEnvelopeInvalid,
    CoreLogin,
    CoreLoginRefused,
    CoreRefused,
    PayerBusy,
    _shown,
    core_answer,
    core_request,
)
from services.insurance.core_xop import SOAP_TYPES, field_text, read_xop_package

SOAP_NS = "http://www.w3.org/2003/05/soap-envelope"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
CORE_NS = "http://www.caqh.org/SOAP/WSDL/CORERule2.2.0.xsd"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
# The UsernameToken Profile 1.0 type of a password sent as it is (the rule's choice, over TLS): a URI, no secret.
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"  # noqa: S105
)
SOAP_ACTION = "RealTimeTransaction"
CONTENT_TYPE = f'application/soap+xml; charset=utf-8; action="{SOAP_ACTION}"'
MTOM_TYPE = "multipart/related"  # an MTOM answer: the envelope in a XOP package (`core_xop`)
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # a real-time 271 is kilobytes; this is a bound, not an expectation
# WS-Security 1.0 fault subcodes (SOAP Message Security §12) that say our token is not a login here.
LOGIN_FAULTS = {
    "FailedAuthentication",
    "InvalidSecurityToken",
    "InvalidSecurity",
    "SecurityTokenUnavailable",
    "UnsupportedSecurityToken",
}
_CANONICAL = {name.lower(): name for name in ENVELOPE_FIELDS}


def soap_request(payload: str, *, payload_id: str, login: CoreLogin, receiver_id: str, at: datetime) -> bytes:
    """The SOAP 1.2 envelope of a CORE real-time request: the login in the Header, the fields in the Body."""
    fields = core_request(payload, payload_id=payload_id, login=login, receiver_id=receiver_id, at=at)
    username, password = fields.pop("UserName", None), fields.pop("Password", None)
    header = ""
    if username is not None and password is not None:
        header = (
            f'<soap:Header><wsse:Security xmlns:wsse="{WSSE_NS}" soap:mustUnderstand="true">'
            f"<wsse:UsernameToken><wsse:Username>{escape(username)}</wsse:Username>"
            f"<wsse:Password Type={quoteattr(PASSWORD_TEXT)}>{escape(password)}</wsse:Password>"
            "</wsse:UsernameToken></wsse:Security></soap:Header>"
        )
    body = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soap:Envelope xmlns:soap="{SOAP_NS}">{header}<soap:Body>'
        f'<cor:COREEnvelopeRealTimeRequest xmlns:cor="{CORE_NS}">{body}</cor:COREEnvelopeRealTimeRequest>'
        "</soap:Body></soap:Envelope>"
    ).encode()


def read_soap_envelope(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a `COREEnvelopeRealTimeResponse` in a SOAP 1.2 envelope; a SOAP Fault raises its outcome."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in SOAP_TYPES | {MTOM_TYPE}:
        raise CoreEnvelopeInvalid(f"the answer is {_shown(media_type) or 'untyped'}, not a SOAP 1.2 envelope")
    if len(body) > MAX_ANSWER_BYTES:
        raise CoreEnvelopeInvalid(f"the answer is larger than {MAX_ANSWER_BYTES} bytes; it was not read")
    parts: Mapping[str, bytes] = {}
    if media_type == MTOM_TYPE:
        package = read_xop_package(content_type, body)
        body, parts = package.root, package.parts
    try:
        root = safe_xml.fromstring(body, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise CoreEnvelopeInvalid(f"its XML declares a DTD or entities ({type(exc).__name__})") from None
    except (safe_xml.ParseError, ValueError, LookupError) as exc:  # LookupError: an unknown encoding
        raise CoreEnvelopeInvalid(f"its XML cannot be read ({type(exc).__name__})") from None
    if root.tag == f"{{{SOAP11_NS}}}Envelope":
        raise CoreEnvelopeInvalid("it is a SOAP 1.1 envelope; CORE's SOAP form is SOAP 1.2")
    if root.tag != f"{{{SOAP_NS}}}Envelope":
        raise CoreEnvelopeInvalid("it is XML, but not a SOAP 1.2 envelope")
    soap_body = root.find(f"{{{SOAP_NS}}}Body")
    if soap_body is None:
        raise CoreEnvelopeInvalid("its SOAP envelope has no Body")
    fault = soap_body.find(f"{{{SOAP_NS}}}Fault")
    if fault is not None:
        raise fault_outcome(fault)
    # Some servers wrap the response element (…RequestResponse); it is looked for anywhere in the Body.
    response = next(soap_body.iter(f"{{{CORE_NS}}}COREEnvelopeRealTimeResponse"), None)
    if response is None:
        raise CoreEnvelopeInvalid("its SOAP Body holds no COREEnvelopeRealTimeResponse")
    fields: dict[str, str] = {}
    for child in response:
        # The XSD's children are unqualified; some servers qualify them. The local name counts.
        name = _CANONICAL.get(_local(child.tag).lower(), _local(child.tag))
        if name in fields:
            raise CoreEnvelopeInvalid(f"the field {_shown(name)} comes twice")
        fields[name] = field_text(child, parts)
    return fields


def fault_outcome(fault: Element) -> Exception:
    """What a SOAP 1.2 Fault means for us: our login refused, the payer busy, or our envelope refused."""
    code, subcodes = "", list[str]()
    level = fault.find(f"{{{SOAP_NS}}}Code")
    while (
        level is not None
    ):  # Code/Value, then each nested Subcode/Value: QNames such as wsse:FailedAuthentication
        value = _local(level.findtext(f"{{{SOAP_NS}}}Value", "").strip())
        if level.tag.endswith("}Code"):
            code = value
        elif value:
            subcodes.append(value)
        level = level.find(f"{{{SOAP_NS}}}Subcode")
    shown = " ".join(token for token in (_shown(code), *map(_shown, subcodes)) if token)
    named = f"SOAP Fault {shown}" if shown else "a SOAP Fault"
    if any(sub in LOGIN_FAULTS or sub in LOGIN_ERRORS for sub in subcodes):
        return CoreLoginRefused(named)
    if code == "Receiver" or any(sub in TRANSIENT_ERRORS for sub in subcodes):
        return PayerBusy(named)
    return CoreRefused(named)


def soap_answer_payload(status: int, content_type: str, body: bytes, payload_id: str) -> str:
    """The X12 of a payer's SOAP answer: its envelope (or Fault) decides, the status only where there is none."""
    try:
        fields = read_soap_envelope(content_type, body)
    except CoreEnvelopeInvalid:
        if status >= 500:
            raise PayerBusy(f"HTTP {status}") from None
        if status in {401, 403}:
            raise CoreLoginRefused(f"HTTP {status}") from None
        if status != 200:
            raise CoreEnvelopeInvalid(f"HTTP {status} without a SOAP envelope") from None
        raise
    if status != 200 and fields.get("ErrorCode") == "Success":
        raise CoreEnvelopeInvalid(f"HTTP {status} with ErrorCode Success")
    return core_answer(fields, payload_id)


def _local(name: str) -> str:
    """The local part of `{namespace}name` or `prefix:name`."""
    return name.rsplit("}", 1)[-1].rsplit(":", 1)[-1]
