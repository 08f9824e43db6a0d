"""The CAQH CORE envelope in its SOAP+WSDL form (Connectivity Rule vC2.2.0: SOAP 1.2, WS-Security UsernameToken)
around the X12 connector's 270: what goes out, how the answer (or a SOAP Fault) is read, and what each becomes.
The payer is an httpx.MockTransport that reads the request with defusedxml and XPath-like lookups of its own,
not with the connector's reader."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

import defusedxml.ElementTree as safe_xml
import httpx
import pytest
from structlog.testing import capture_logs

from services.insurance.core import CoreLogin
from services.insurance.x12 import validate
from services.insurance.x12_connector import Eligibility, X12Connector
from tests.pki import Authority
from tests.unit.test_insurance_core import Payer as MimePayer
from tests.unit.test_insurance_x12_answers import ACTIVE, CONNECTOR, COVERAGE, PAYER, PLAN, answer

SOAP = "http://www.w3.org/2003/05/soap-envelope"
CORE = "http://www.caqh.org/SOAP/WSDL/CORERule2.2.0.xsd"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
)
LOGIN = CoreLogin("reading-group", "s3cret-Pa55word", "SECONDOPINION")
SOAP_PAYER = PAYER.model_copy(
    update={"core_envelope": "soap", "endpoint_url": "https://127.0.0.1:9/core/soap"}
)
ANSWER_271 = "X12_271_Response_005010X279A1"
Reply = Callable[[dict[str, str]], httpx.Response]


def body_fields(request: httpx.Request) -> dict[str, str]:
    """The COREEnvelopeRealTimeRequest's fields (unqualified children, as the XSD has them) and its login."""
    root = safe_xml.fromstring(request.read(), forbid_dtd=True)
    assert root.tag == f"{{{SOAP}}}Envelope"
    envelope = root.find(f"{{{SOAP}}}Body/{{{CORE}}}COREEnvelopeRealTimeRequest")
    assert envelope is not None
    fields = {child.tag: child.text or "" for child in envelope}
    token = root.find(f"{{{SOAP}}}Header/{{{WSSE}}}Security/{{{WSSE}}}UsernameToken")
    if token is not None:
        password = token.find(f"{{{WSSE}}}Password")
        assert password is not None and password.get("Type") == PASSWORD_TEXT
        fields["token:Username"] = token.findtext(f"{{{WSSE}}}Username") or ""
        fields["token:Password"] = password.text or ""
    return fields


def response(status: int = 200, qualified: bool = False, **fields: str) -> httpx.Response:
    """A payer's COREEnvelopeRealTimeResponse in a SOAP 1.2 envelope."""
    prefix = "ns1:" if qualified else ""
    elements = "".join(f"<{prefix}{name}>{escape(value)}</{prefix}{name}>" for name, value in fields.items())
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><env:Envelope xmlns:env="{SOAP}"><env:Body>'
        f'<ns1:COREEnvelopeRealTimeResponse xmlns:ns1="{CORE}">{elements}</ns1:COREEnvelopeRealTimeResponse>'
        "</env:Body></env:Envelope>"
    )
    return httpx.Response(status, headers={"Content-Type": "application/soap+xml; charset=utf-8"}, text=xml)


def success_fields(request: dict[str, str], payload: str) -> dict[str, str]:
    """The fields of a COREEnvelopeRealTimeResponse answering `request` with `payload`, in the rule's order."""
    return {
        "PayloadType": ANSWER_271,
        "ProcessingMode": "RealTime",
        "PayloadID": request["PayloadID"],
        "TimeStamp": "2026-12-06T12:00:00Z",
        "SenderID": "SBX01",
        "ReceiverID": request["SenderID"],
        "CORERuleVersion": "2.2.0",
        "Payload": payload,
        "ErrorCode": "Success",
        "ErrorMessage": "None",
    }


def success(
    request: dict[str, str], payload: str | None = None, qualified: bool = False, **override: str
) -> httpx.Response:
    fields = success_fields(request, answer(ACTIVE) if payload is None else payload)
    return response(qualified=qualified, **{**fields, **override})


def fault(code: str, subcode: str = "", status: int = 500, reason: str = "refused") -> Reply:
    sub = f"<env:Subcode><env:Value>{subcode}</env:Value></env:Subcode>" if subcode else ""
    xml = (
        f'<env:Envelope xmlns:env="{SOAP}" xmlns:wsse="{WSSE}"><env:Body><env:Fault>'
        f"<env:Code><env:Value>env:{code}</env:Value>{sub}</env:Code>"
        f'<env:Reason><env:Text xml:lang="en">{escape(reason)}</env:Text></env:Reason>'
        "</env:Fault></env:Body></env:Envelope>"
    )
    return lambda _: httpx.Response(status, headers={"Content-Type": "application/soap+xml"}, text=xml)


class Payer(MimePayer):
    """A CORE SOAP server: the same scripted payer, reading the request's SOAP Body on its own."""

    read = staticmethod(body_fields)


def check(payer: Callable[[httpx.Request], httpx.Response], login: CoreLogin = LOGIN) -> Eligibility:
    connector = X12Connector(SOAP_PAYER, PLAN, **CONNECTOR, login=login, transport=httpx.MockTransport(payer))
    return connector.check(COVERAGE, "76140")


def test_the_270_goes_out_as_a_soap_12_core_envelope_with_a_username_token() -> None:
    payer = Payer(success)
    assert check(payer).outcome == "active"
    [request], [fields] = payer.raw, payer.sent
    media_type, *parameters = (part.strip() for part in request.headers["content-type"].split(";"))
    assert media_type == "application/soap+xml"
    assert {"charset=utf-8", 'action="RealTimeTransaction"'} <= set(parameters)  # the WSDL's soapAction
    assert list(fields) == [
        "PayloadType",
        "ProcessingMode",
        "PayloadID",
        "TimeStamp",
        "SenderID",
        "ReceiverID",
        "CORERuleVersion",
        "Payload",
        "token:Username",
        "token:Password",
    ]  # the XSD's sequence; the login only in the WS-Security header, never in the Body
    assert (fields["PayloadType"], fields["ProcessingMode"], fields["CORERuleVersion"]) == (
        "X12_270_Request_005010X279A1",
        "RealTime",
        "2.2.0",
    )
    assert (fields["token:Username"], fields["token:Password"]) == ("reading-group", "s3cret-Pa55word")
    assert (fields["SenderID"], fields["ReceiverID"]) == ("SECONDOPINION", "SBX01")
    assert uuid.UUID(fields["PayloadID"]).version == 1
    assert datetime.fromisoformat(fields["TimeStamp"]).utcoffset() is not None
    validate(fields["Payload"], "270")
    assert "s3cret" not in str(request.url) and "s3cret" not in str(request.headers)


def test_an_x509_login_sends_no_username_token(tmp_path: Path) -> None:
    issued = Authority(tmp_path, "clearinghouse").issue("reading-group")
    login = CoreLogin("reading-group", "s3cret-Pa55word", "SECONDOPINION", str(issued.cert), str(issued.key))
    payer = Payer(success)
    assert check(payer, login).outcome == "active"
    [request] = payer.raw
    assert b"s3cret" not in request.content and b"UsernameToken" not in request.content
    assert b"Header" not in request.content


def test_a_mime_payer_still_gets_the_multipart_envelope() -> None:
    seen: list[str] = []

    def payer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["content-type"])
        return httpx.Response(503)

    X12Connector(PAYER, PLAN, **CONNECTOR, login=LOGIN, transport=httpx.MockTransport(payer)).check(
        COVERAGE, "76140"
    )
    assert seen and all(kind.startswith("multipart/form-data") for kind in seen)


@pytest.mark.parametrize(
    "reply",
    [
        fault("Sender", "wsse:FailedAuthentication", reason="bad password s3cret-Pa55word for SBX-MET"),
        fault("Sender", "wsse:FailedAuthentication", status=400),
        fault("Sender", "wsse:InvalidSecurity", status=400),
        lambda r: success(r, PayloadType="CoreEnvelopeError", ErrorCode="UnAuthorized", Payload=""),
        lambda _: httpx.Response(401, text="Unauthorized"),  # no envelope: the HTTP status says it
    ],
    ids=[
        "failed-authentication-500",
        "failed-authentication-400",
        "invalid-security",
        "core-code",
        "http-401",
    ],
)
def test_a_refused_login_is_payer_rejected_and_names_the_settings_not_the_password(reply: Reply) -> None:
    payer = Payer(reply)
    with capture_logs() as logs:
        eligibility = check(payer)
    assert (eligibility.outcome, eligibility.standing) == ("payer_rejected", "rejected")
    assert "refused our CAQH CORE login" in eligibility.detail
    assert "INSURANCE_CORE_PASSWORD" in eligibility.detail and "INSURANCE_CORE_USERNAME" in eligibility.detail
    assert "s3cret" not in eligibility.detail and "SBX-MET" not in eligibility.detail
    assert "s3cret" not in repr(logs) and "SBX-MET" not in repr(logs)
    assert len(payer.sent) == 1  # a refused login is not retried


def test_the_fault_code_is_named_and_its_reason_text_never() -> None:
    eligibility = check(
        Payer(fault("Sender", "wsse:FailedAuthentication", reason="member SBX-MET, pw s3cret"))
    )
    assert "(SOAP Fault Sender FailedAuthentication)" in eligibility.detail
    other = check(Payer(fault("Sender", "cor:PayloadIDIllegal", status=400, reason="patient SBX-MET")))
    assert other.outcome == "payer_rejected"
    assert "refused our CAQH CORE envelope (SOAP Fault Sender PayloadIDIllegal)" in other.detail
    assert "SBX-MET" not in other.detail


@pytest.mark.parametrize(
    "reply",
    [fault("Receiver"), fault("Receiver", "cor:Busy"), lambda r: success(r, ErrorCode="Busy", Payload="")],
    ids=["receiver", "receiver-busy", "core-busy"],
)
def test_a_busy_payer_is_retried_then_payer_unavailable(reply: Reply) -> None:
    payer = Payer(reply)
    eligibility = check(payer)
    assert eligibility.outcome == "payer_unavailable"
    assert "after 3 attempts" in eligibility.detail
    assert len(payer.sent) == 3
    assert len({fields["PayloadID"] for fields in payer.sent}) == 3


def test_a_busy_payer_that_answers_on_the_retry_is_covered() -> None:
    payer = Payer(fault("Receiver", "cor:Busy"), success)
    assert check(payer).outcome == "active"
    assert len(payer.sent) == 2


def test_other_core_errors_are_payer_rejected_with_their_code_only() -> None:
    def reply(request: dict[str, str]) -> httpx.Response:
        return success(
            request,
            PayloadType="CoreEnvelopeError",
            ErrorCode="VersionMismatch",
            ErrorMessage="4.0.0 SBX-MET",
        )

    payer = Payer(reply)
    eligibility = check(payer)
    assert eligibility.outcome == "payer_rejected"
    assert "refused our CAQH CORE envelope (VersionMismatch)" in eligibility.detail
    assert "SBX-MET" not in eligibility.detail and len(payer.sent) == 1


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">]>'
    f'<env:Envelope xmlns:env="{SOAP}"><env:Body>&lol2;</env:Body></env:Envelope>'
)
EXTERNAL = (
    '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    f'<env:Envelope xmlns:env="{SOAP}"><env:Body>&x;</env:Body></env:Envelope>'
)
SOAP_11 = '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body/></soap:Envelope>'


def xml(text: str, status: int = 200) -> Reply:
    return lambda _: httpx.Response(status, headers={"Content-Type": "application/soap+xml"}, text=text)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (lambda r: success(r, PayloadID=str(uuid.uuid4())), "PayloadID is not the one we sent"),
        (lambda r: success(r, PayloadType="X12_277_Response_005010X212"), "PayloadType is X12_277"),
        (lambda r: success(r, payload=""), "no Payload"),
        (lambda r: success(r, ErrorCode=""), "no ErrorCode"),
        (xml(BOMB), "declares a DTD or entities"),
        (xml(EXTERNAL), "declares a DTD or entities"),
        (xml("<env:Envelope"), "its XML cannot be read"),
        (xml('<?xml version="1.0" encoding="x-foo"?><a/>'), "its XML cannot be read"),  # no such encoding
        (xml(SOAP_11), "SOAP 1.1 envelope"),
        (
            xml(f'<env:Envelope xmlns:env="{SOAP}"><env:Body/></env:Envelope>'),
            "no COREEnvelopeRealTimeResponse",
        ),
        (lambda _: httpx.Response(200, text=answer(ACTIVE)), "not a SOAP 1.2 envelope"),  # a bare 271
        (lambda _: httpx.Response(404, text="not here"), "HTTP 404 without a SOAP envelope"),
        (lambda _: response(400, ErrorCode="Success"), "HTTP 400 with ErrorCode Success"),
    ],
)
def test_an_answer_that_is_no_soap_envelope_for_our_request_is_malformed(reply: Reply, why: str) -> None:
    eligibility = check(Payer(reply))
    assert eligibility.outcome == "malformed_response"
    assert "did not answer with a valid CAQH CORE envelope" in eligibility.detail
    assert why in eligibility.detail


def test_an_oversized_answer_is_not_parsed() -> None:
    huge = xml(
        f'<env:Envelope xmlns:env="{SOAP}"><env:Body>{"x" * (9 * 1024 * 1024)}</env:Body></env:Envelope>'
    )
    eligibility = check(Payer(huge))
    assert eligibility.outcome == "malformed_response" and "larger than" in eligibility.detail


def test_qualified_children_a_wrapper_and_cdata_are_read() -> None:
    # Some servers qualify the children, wrap the response (WCF's …RequestResponse) and send the X12 as CDATA.
    def reply(request: dict[str, str]) -> httpx.Response:
        text = (
            f'<s:Envelope xmlns:s="{SOAP}"><s:Header/><s:Body><w:Wrapper xmlns:w="urn:wrapper">'
            f'<COREEnvelopeRealTimeResponse xmlns="{CORE}"><PayloadType>{ANSWER_271}</PayloadType>'
            f"<PayloadID>{request['PayloadID']}</PayloadID><Payload>\n<![CDATA[{answer(ACTIVE)}]]>\n</Payload>"
            "<ErrorCode>Success</ErrorCode></COREEnvelopeRealTimeResponse></w:Wrapper></s:Body></s:Envelope>"
        )
        return httpx.Response(200, headers={"Content-Type": "application/soap+xml; charset=utf-8"}, text=text)

    assert check(Payer(reply)).outcome == "active"
    assert check(Payer(lambda r: success(r, qualified=True))).outcome == "active"
