"""An MTOM answer (SOAP 1.2 Message Transmission Optimization Mechanism): the envelope in a XOP package.

The Connectivity Rule's SOAP+WSDL form names MTOM, and a payer's SOAP stack with MTOM on packages every answer
so, real-time ones included: `multipart/related; type="application/xop+xml"; start="<root>";
start-info="application/soap+xml"`. The root part (the one whose Content-ID the `start` parameter names, else
the first) holds the envelope as `application/xop+xml; type="application/soap+xml"`, and an element whose
content was moved out of it holds only `<xop:Include href="cid:..."/>`, naming the part that holds its octets
(XOP 1.0; the `cid:` URL of RFC 2392 is the part's Content-ID without its angle brackets, %-encoded). A
real-time Payload so moved is the 271's octets in a part of its own.

A package is read one level deep: a part that is itself multipart, an xop:Include anywhere but directly in a
field, a reference to a part the package does not carry (or to the root itself), or a root that is not a SOAP
envelope is `CoreEnvelopeInvalid`. Its size is the answer's, bounded before it is read (`MAX_ANSWER_BYTES`).
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import MIMEPart
from urllib.parse import unquote
from xml.etree.ElementTree import Element  # noqa: S405 - typing only; parsing is defusedxml's

from services.insurance.core import CoreEnvelopeInvalid, _shown, mime_message

XOP_NS = "http://www.w3.org/2004/08/xop/include"
XOP_INCLUDE = f"{{{XOP_NS}}}Include"
XOP_TYPE = "application/xop+xml"
SOAP_TYPES = {"application/soap+xml", "text/xml", "application/xml"}


@dataclass(frozen=True)
class XopPackage:
    """The root part's octets (the SOAP envelope) and the other parts' by Content-ID (no angle brackets)."""

    root: bytes
    parts: Mapping[str, bytes]


def read_xop_package(content_type: str, body: bytes) -> XopPackage:
    """The SOAP envelope of a `multipart/related` answer and the parts its xop:Include elements may name."""
    package = mime_message(content_type, body)
    start = _content_id(_param(package, "start"))
    parts: dict[str, bytes] = {}
    root: MIMEPart | None = None
    for index, part in enumerate(package.iter_parts()):
        if part.is_multipart():
            raise CoreEnvelopeInvalid(
                "its MTOM package nests a multipart in a part; it is read one level deep"
            )
        content_id = _content_id(str(part.get("Content-ID", "")))
        is_root = content_id == start if start else index == 0
        if is_root:
            root = part
            continue  # the root is no part an xop:Include may name
        if content_id in parts:
            raise CoreEnvelopeInvalid("two parts of its MTOM package have the same Content-ID")
        if content_id:
            octets = part.get_payload(decode=True)
            parts[content_id] = octets if isinstance(octets, bytes) else b""
    if root is None:
        raise CoreEnvelopeInvalid(
            "its MTOM package has no part with the Content-ID its start parameter names"
        )
    root_type = _root_type(root, package)
    if root_type not in SOAP_TYPES:
        raise CoreEnvelopeInvalid(
            f"the root part of its MTOM package is {_shown(root_type) or 'untyped'}, not a SOAP 1.2 envelope"
        )
    envelope = root.get_payload(decode=True)
    return XopPackage(envelope if isinstance(envelope, bytes) else b"", parts)


def field_text(element: Element, parts: Mapping[str, bytes]) -> str:
    """A CORE field's value: its text, or the part its one xop:Include names (as UTF-8 text)."""
    includes = list(element.iter(XOP_INCLUDE))
    if not includes:
        return "".join(element.itertext()).strip()  # pretty-printed XML pads the values
    include = includes[0]
    if (
        len(includes) > 1
        or list(element) != [include]
        or (element.text or "").strip()
        or (include.tail or "").strip()
    ):
        raise CoreEnvelopeInvalid("an xop:Include is not the only content of its field")
    href = include.get("href", "")
    if not href.lower().startswith("cid:"):
        raise CoreEnvelopeInvalid("an xop:Include's href is not a cid: URL")
    octets = parts.get(_content_id(unquote(href[4:])))
    if octets is None:
        raise CoreEnvelopeInvalid("an xop:Include names a part its MTOM package does not carry")
    try:
        return octets.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CoreEnvelopeInvalid("the part an xop:Include names is not UTF-8 text") from None


def _root_type(root: MIMEPart, package: MIMEPart) -> str:
    """The root part's media type; for application/xop+xml, the type of the document it carries."""
    typed = root.get("Content-Type") is not None
    media_type = root.get_content_type() if typed else _param(package, "type")
    if media_type.split(";", 1)[0].strip().lower() == XOP_TYPE:
        media_type = (_param(root, "type") if typed else "") or _param(package, "start-info")
    return media_type.split(";", 1)[0].strip().lower()


def _param(message: MIMEPart, name: str) -> str:
    value = message.get_param(name)
    return email.utils.collapse_rfc2231_value(value) if isinstance(value, tuple) else str(value or "")


def _content_id(value: str) -> str:
    """A Content-ID (or `start`, or a `cid:` URL's decoded rest) as compared: no angle brackets or blanks."""
    return value.strip().removeprefix("<").removesuffix(">").strip()
