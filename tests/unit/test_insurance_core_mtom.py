"""A CAQH CORE SOAP answer sent with MTOM (Connectivity Rule vC2.2.0's SOAP+WSDL form, SOAP 1.2 MTOM / XOP 1.0):
the envelope in a `multipart/related` package, its Payload an xop:Include naming the part that holds the 271.
The payer is the scripted SOAP payer of test_insurance_core_soap; its packages are written here, by hand."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from xml.sax.saxutils import quoteattr

import httpx
import pytest

from tests.unit.test_insurance_core_soap import CORE, SOAP, WSSE, Payer, Reply, check, success_fields
from tests.unit.test_insurance_x12_answers import ACTIVE, answer

XOP = "http://www.w3.org/2004/08/xop/include"
ROOT_ID = "root.message@payer.example"
PAYLOAD_ID = "http://tempuri.org/1/payload 271@payer.example"  # WCF's style: a URL, quoted in the href
ROOT_TYPE = 'application/xop+xml; charset=utf-8; type="application/soap+xml"'


def href(content_id: str = PAYLOAD_ID) -> str:
    return "cid:" + "".join(c if c.isalnum() or c in "-._" else f"%{ord(c):02X}" for c in content_id)


def include(target: str | None = None) -> str:
    return f'<xop:Include xmlns:xop="{XOP}" href={quoteattr(target or href())}/>'


def envelope(request: dict[str, str], payload: str | None = None) -> str:
    """The COREEnvelopeRealTimeResponse answering `request`, its Payload element's content as given (XML)."""
    fields = success_fields(request, include() if payload is None else payload)  # the Payload left unescaped
    elements = "".join(f"<{name}>{value}</{name}>" for name, value in fields.items())
    return (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body>'
        f'<COREEnvelopeRealTimeResponse xmlns="{CORE}">{elements}</COREEnvelopeRealTimeResponse>'
        "</s:Body></s:Envelope>"
    )


def package(
    root: str,
    parts: list[tuple[str, str, bytes]] | None = None,
    *,
    start: str | None = f"<{ROOT_ID}>",
    root_type: str | None = ROOT_TYPE,
    root_last: bool = False,
    encoding: str = "binary",
    status: int = 200,
) -> httpx.Response:
    """An MTOM answer: `root` (the SOAP envelope) and `parts` (Content-ID, Content-Type, octets)."""
    boundary = f"uuid:{uuid.uuid4()}"
    head = f"Content-ID: <{ROOT_ID}>\r\nContent-Transfer-Encoding: 8bit\r\n"
    head += f"Content-Type: {root_type}\r\n" if root_type else ""
    chunks = [(head.encode(), root.encode())]
    for content_id, content_type, octets in parts if parts is not None else []:
        body = base64.encodebytes(octets) if encoding == "base64" else octets
        chunks.append(
            (
                f"Content-ID: <{content_id}>\r\nContent-Type: {content_type}\r\n"
                f"Content-Transfer-Encoding: {encoding}\r\n".encode(),
                body,
            )
        )
    if root_last:
        chunks.append(chunks.pop(0))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + h + b"\r\n" + b + b"\r\n" for h, b in chunks)
    parameters = f'type="application/xop+xml"; start-info="application/soap+xml"; boundary="{boundary}"'
    if start:
        parameters += f'; start="{start}"'
    return httpx.Response(
        status,
        headers={"Content-Type": f"multipart/related; {parameters}"},
        content=body + f"--{boundary}--\r\n".encode(),
    )


def mtom(
    payload: str | None = None,
    parts: Callable[[str], list[tuple[str, str, bytes]]] | None = None,
    **options: object,
) -> Reply:
    """A payer answering our request with MTOM: by default the 271 in a part of its own, named by href()."""

    def reply(request: dict[str, str]) -> httpx.Response:
        the_271 = answer(ACTIVE)
        carried = parts(the_271) if parts else [(PAYLOAD_ID, "application/octet-stream", the_271.encode())]
        return package(envelope(request, payload), carried, **options)  # type: ignore[arg-type]

    return reply


@pytest.mark.parametrize(
    "reply",
    [
        mtom(),
        mtom(root_last=True),  # the start parameter names the root, wherever it is
        mtom(start=None),  # no start parameter: the first part is the root
        mtom(encoding="base64"),
        mtom(root_type="application/xop+xml"),  # the carried type from the package's start-info
        mtom(payload=include(f"cid:<{PAYLOAD_ID}>")),  # the Content-ID with its angle brackets, unquoted
        mtom(payload=f"<![CDATA[{answer(ACTIVE)}]]>", parts=lambda _: []),  # MTOM, the Payload inline
    ],
    ids=["part", "root-last", "no-start", "base64-part", "start-info", "bracketed-cid", "inline"],
)
def test_an_mtom_answer_is_read_and_its_payload_part_is_the_271(reply: Reply) -> None:
    payer = Payer(reply)
    eligibility = check(payer)
    assert (eligibility.outcome, eligibility.detail) == ("active", "")
    assert len(payer.sent) == 1


def test_a_login_fault_in_an_mtom_package_is_a_refused_login() -> None:
    fault = (
        f'<s:Envelope xmlns:s="{SOAP}" xmlns:wsse="{WSSE}"><s:Body><s:Fault>'
        "<s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>wsse:FailedAuthentication</s:Value></s:Subcode></s:Code>"
        '<s:Reason><s:Text xml:lang="en">no</s:Text></s:Reason></s:Fault></s:Body></s:Envelope>'
    )
    eligibility = check(Payer(lambda _: package(fault, status=400)))
    assert eligibility.outcome == "payer_rejected"
    assert "refused our CAQH CORE login (SOAP Fault Sender FailedAuthentication)" in eligibility.detail


def nested(x12: str) -> list[tuple[str, str, bytes]]:
    inner = f"--inner\r\nContent-Type: application/octet-stream\r\n\r\n{x12}\r\n--inner--\r\n".encode()
    return [(PAYLOAD_ID, 'multipart/related; boundary="inner"', inner)]


def cut_short(request: dict[str, str]) -> httpx.Response:
    whole = mtom()(request)
    return httpx.Response(200, headers=whole.headers, content=whole.content[:-40])


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (mtom(parts=lambda _: []), "an xop:Include names a part its MTOM package does not carry"),
        (mtom(payload=include(href(ROOT_ID))), "an xop:Include names a part its MTOM package does not carry"),
        (mtom(parts=nested), "its MTOM package nests a multipart in a part; it is read one level deep"),
        (
            mtom(payload=f"<Wrapped>{include()}</Wrapped>"),
            "an xop:Include is not the only content of its field",
        ),
        (mtom(payload=f"ISA*00*{include()}"), "an xop:Include is not the only content of its field"),
        (mtom(payload=include("https://payer.example/271")), "an xop:Include's href is not a cid: URL"),
        (
            mtom(root_type="text/plain"),
            "the root part of its MTOM package is text/plain, not a SOAP 1.2 envelope",
        ),
        (
            mtom(root_type='application/xop+xml; type="text/html"'),
            "the root part of its MTOM package is text/html, not a SOAP 1.2 envelope",
        ),
        (mtom(start="<elsewhere@payer.example>"), "no part with the Content-ID its start parameter names"),
        (
            mtom(parts=lambda x12: [(PAYLOAD_ID, "application/octet-stream", x12.encode())] * 2),
            "two parts of its MTOM package have the same Content-ID",
        ),
        (
            mtom(parts=lambda _: [(PAYLOAD_ID, "application/octet-stream", b"ISA*\xff\xfe~")]),
            "the part an xop:Include names is not UTF-8 text",
        ),
        (cut_short, "its multipart body is cut short"),
    ],
    ids=[
        "missing-part",
        "the-root-itself",
        "nested-multipart",
        "include-nested-in-the-field",
        "include-beside-text",
        "href-not-cid",
        "root-text-plain",
        "root-carrying-html",
        "start-names-no-part",
        "content-id-twice",
        "part-not-utf8",
        "cut-short",
    ],
)
def test_an_mtom_package_that_cannot_be_resolved_is_malformed_and_says_why(reply: Reply, why: str) -> None:
    payer = Payer(reply)
    eligibility = check(payer)
    assert eligibility.outcome == "malformed_response"
    assert "did not answer with a valid CAQH CORE envelope" in eligibility.detail
    assert why in eligibility.detail
    assert "tempuri" not in eligibility.detail and "payer.example" not in eligibility.detail
    assert len(payer.sent) == 1  # a malformed answer is not asked again


def test_an_mtom_answer_over_the_bound_is_not_read() -> None:
    huge = mtom(parts=lambda x12: [(PAYLOAD_ID, "application/octet-stream", x12.encode() + b" " * 9_000_000)])
    eligibility = check(Payer(huge))
    assert eligibility.outcome == "malformed_response" and "larger than" in eligibility.detail
