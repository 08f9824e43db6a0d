"""`python -m tests.payer_sandbox [PORT]`: the payer sandbox on 127.0.0.1 (see the package docstring)."""

from __future__ import annotations

import hmac
import io
import json
import os
import re
import ssl
import sys
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import defusedxml.ElementTree as safe_xml
import python_multipart
from defusedxml import DefusedXmlException
from python_multipart.exceptions import FormParserError

from services.insurance.x12 import REPETITION_SEP, X12Invalid, envelope, segment, validate

MEMBERS_FILE = Path(__file__).with_name("members.json")
CORE_RULE_VERSION = "2.2.0"
REQUEST_TYPE = "X12_270_Request_005010X279A1"
RESPONSE_TYPE = "X12_271_Response_005010X279A1"
ERROR_TYPE = "CoreEnvelopeError"
# What the real-time request envelope must carry besides the login (CORE Connectivity Rule vC2.2.0).
REQUIRED = (
    "PayloadType",
    "ProcessingMode",
    "PayloadID",
    "TimeStamp",
    "SenderID",
    "ReceiverID",
    "CORERuleVersion",
)
# HTTP status of an envelope error: authentication 401, authorization 403, every other envelope error 400.
HTTP_STATUS = {"Success": 200, "UnAuthorized": 401, "Sender/ReceiverNotAuthorized": 403}
SUBSCRIBER = re.compile(r"NM1\*IL\*(?:[^*~]*\*){7}([^*~]*)")  # NM109 of the 270's 2100C
# The SOAP+WSDL form: SOAP 1.2, the CORE XSD's namespace (its elements' children unqualified), WS-Security 1.0.
SOAP_NS = "http://www.w3.org/2003/05/soap-envelope"
CORE_NS = "http://www.caqh.org/SOAP/WSDL/CORERule2.2.0.xsd"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
PASSWORD_TEXT = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
)
REQUEST_ELEMENTS = (*REQUIRED[:7], "Payload")  # COREEnvelopeRealTimeRequest's sequence
XOP_NS = "http://www.w3.org/2004/08/xop/include"


def member_of(request: str) -> str:
    """The member id a 270 asks about, read before the 270 is validated (for the misbehaving members)."""
    found = SUBSCRIBER.search(request)
    return found.group(1) if found else ""


class Payer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.id: str = config["payer"]["id"]
        self.name: str = config["payer"]["name"]
        core = config["payer"]["core"]
        self.username: str = core["username"]
        self.password: str = core["password"]
        self.senders: set[str] = set(core["sender_ids"])
        # The X.509 login: client certificates (verified against PAYER_SANDBOX_CLIENT_CA) with these subject
        # common names log in without UserName and Password.
        self.certificate_subjects: set[str] = set(core.get("certificate_subjects", []))
        self.members: dict[str, dict[str, Any]] = config["members"]
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def refusal(self, fields: dict[str, str], subject: str | None = None) -> tuple[str, str] | None:
        """The CORE ErrorCode and ErrorMessage for an envelope this payer does not take, or None.

        `subject`: the common name of the client certificate the TLS handshake verified, if any."""
        if subject is not None:
            if subject not in self.certificate_subjects:
                return "UnAuthorized", "the client certificate is not a login for this payer"
        else:
            login_ok = hmac.compare_digest(fields.get("UserName", "").encode(), self.username.encode())
            password_ok = hmac.compare_digest(fields.get("Password", "").encode(), self.password.encode())
            if not (login_ok and password_ok):
                return "UnAuthorized", "the UserName and Password are not a valid login for this payer"
        for name in (*REQUIRED, "Payload"):
            if not fields.get(name):
                return f"{name}Required", f"{name} is required"
        if fields["CORERuleVersion"] != CORE_RULE_VERSION:
            return "VersionMismatch", f"this payer speaks CORERuleVersion {CORE_RULE_VERSION}"
        if fields["ProcessingMode"] != "RealTime":
            return "ProcessingModeIllegal", "this endpoint answers ProcessingMode RealTime only"
        if fields["PayloadType"] != REQUEST_TYPE:
            return "PayloadTypeIllegal", f"this endpoint answers {REQUEST_TYPE} only"
        try:
            uuid.UUID(fields["PayloadID"])
        except ValueError:
            return "PayloadIDIllegal", "PayloadID must be a UUID"
        try:
            offset = datetime.fromisoformat(fields["TimeStamp"]).utcoffset()
        except ValueError:
            offset = None
        if offset is None:
            return "TimeStampIllegal", "TimeStamp must be an ISO 8601 date and time with its UTC offset"
        if fields["SenderID"] not in self.senders or fields["ReceiverID"] != self.id:
            return "Sender/ReceiverNotAuthorized", f"this login may not send to ReceiverID {self.id}"
        return None

    def core_busy(self, member: dict[str, Any], member_id: str) -> bool:
        """Whether this call of the member is one its `core_busy_first` answers with CORE `Busy`."""
        if not member.get("core_busy_first"):
            return False
        with self.lock:
            self.calls[f"core:{member_id}"] = call = self.calls.get(f"core:{member_id}", 0) + 1
        return bool(call <= member["core_busy_first"])

    def answer(self, request: str) -> str:
        segments = validate(request, "270")
        values = {s.get_seg_id(): s for s in segments}
        nm1 = {s.get_value("NM101"): s for s in segments if s.get_seg_id() == "NM1"}
        trace = values["TRN"].get_value("TRN02") or ""
        control = int(values["ISA"].get_value("ISA13") or "1")
        member_id = nm1["IL"].get_value("NM109") or ""
        last_name = (nm1["IL"].get_value("NM103") or "").upper()
        provider = [nm1["1P"].get_value(f"NM1{i:02d}") or "" for i in (3, 8, 9)]
        head = [
            segment(
                "BHT",
                "0022",
                "11",
                values["BHT"].get_value("BHT03") or "",
                *time.strftime("%Y%m%d %H%M").split(),
            ),
            segment("HL", "1", "", "20", "1"),
            segment("NM1", "PR", "2", self.name, "", "", "", "", "PI", self.id),
        ]
        if nm1["PR"].get_value("NM109") != self.id:
            return self._wrap([*head, segment("AAA", "N", "", "79", "C")], control)
        member = self.members.get(member_id)
        with self.lock:
            self.calls[member_id] = self.calls.get(member_id, 0) + 1
            call = self.calls[member_id]
        if member and (member.get("reject") == "42" or call <= member.get("busy_first", 0)):
            return self._wrap([*head, segment("AAA", "N", "", "42", "R")], control)
        if member and member.get("delay_seconds"):
            time.sleep(float(member["delay_seconds"]))
        body = [
            *head,
            segment("HL", "2", "1", "21", "1"),
            segment("NM1", "1P", "2", provider[0], "", "", "", "", provider[1], provider[2]),
            segment("HL", "3", "2", "22", "0"),
            segment("TRN", "2", trace, "9SECONDOPN"),
            segment(
                "NM1",
                "IL",
                "1",
                member.get("last_name", "") if member else last_name,
                "",
                "",
                "",
                "",
                "MI",
                member_id,
            ),
        ]
        if member is None:
            body.append(segment("AAA", "Y", "", "75", "C"))
        elif not last_name and member.get("require_name"):
            # The guide's required search: member id, name and birth date; this payer refuses a 270 without them.
            body.append(segment("AAA", "Y", "", "73", "C"))
        elif last_name and member.get("last_name") and last_name != member["last_name"]:
            body.append(segment("AAA", "Y", "", "73", "C"))
        else:
            body += self._benefits(member)
        return self._wrap(body, control)

    def _benefits(self, member: dict[str, Any]) -> list[str]:
        types = REPETITION_SEP.join(("4", "98"))
        if member.get("inactive"):
            return [segment("EB", "6", "IND", types, "PR", member.get("plan", ""))]
        auth = "Y" if member.get("authorization_required") else "N"
        rows = [segment("EB", "1", "IND", types, "PR", member.get("plan", ""), "", "", "", "", "", auth)]
        # In-network terms as configured; out of network the coinsurance doubles and nothing is copay.
        for network in ("Y", "N"):
            coinsurance = Decimal(member.get("coinsurance", "0")) * (1 if network == "Y" else 2)
            copay = member.get("copay", "0.00") if network == "Y" else "0.00"
            rows += [
                segment("EB", "B", "IND", "98", "PR", "", "27", copay, "", "", "", "", network),
                segment(
                    "EB",
                    "A",
                    "IND",
                    "98",
                    "PR",
                    "",
                    "27",
                    "",
                    f"{min(coinsurance, Decimal(1))}",
                    "",
                    "",
                    "",
                    network,
                ),
                segment(
                    "EB",
                    "C",
                    "IND",
                    "4",
                    "PR",
                    "",
                    "23",
                    member.get("deductible", "0.00"),
                    "",
                    "",
                    "",
                    "",
                    network,
                ),
                segment(
                    "EB",
                    "C",
                    "IND",
                    "4",
                    "PR",
                    "",
                    "29",
                    member.get("deductible_remaining", "0.00"),
                    "",
                    "",
                    "",
                    "",
                    network,
                ),
            ]
        return rows

    def _wrap(self, body: list[str], control: int) -> str:
        return envelope(body, functional_id="HB", sender=self.id, receiver="SECONDOPINION", control=control)


def make_handler(payer: Payer, *, mtom: bool = False) -> type[BaseHTTPRequestHandler]:
    """The HTTP handler of `payer`; with `mtom`, its SOAP endpoint answers in MTOM (XOP) packages."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/core/soap":
                return self._soap()
            if self.path != "/core/eligibility":
                return self._reply(404, "text/plain", b"POST /core/eligibility (MIME) or /core/soap (SOAP)")
            fields = self._envelope()
            if fields is None:
                return self._reply(
                    400, "text/plain", b"POST a CORE MIME multipart envelope (multipart/form-data)"
                )
            refusal = payer.refusal(fields, self._certificate_subject())
            if refusal is not None:
                return self._core(fields, ERROR_TYPE, *refusal)
            payload_type, code, message, payload, payload_id = self._answer(fields["Payload"])
            self._core(fields, payload_type, code, message, payload=payload, payload_id=payload_id)

        def _answer(self, request: str) -> tuple[str, str, str, str, str | None]:
            """PayloadType, ErrorCode, ErrorMessage, Payload and PayloadID of the answer to an accepted 270."""
            member_id = member_of(request)
            member = payer.members.get(member_id, {})
            if payer.core_busy(member, member_id):
                return ERROR_TYPE, "Busy", "try again later", "", None
            if member.get("garbled"):
                return RESPONSE_TYPE, "Success", "None", "ISA*this is not an interchange~", None
            try:
                answer = payer.answer(request)
            except (X12Invalid, KeyError) as exc:
                return ERROR_TYPE, "PayloadIllegal", f"the 270 is invalid: {exc}", "", None
            return RESPONSE_TYPE, "Success", "None", answer, member.get("answer_payload_id")

        def _soap(self) -> None:
            """The SOAP+WSDL form: a COREEnvelopeRealTimeRequest in, a COREEnvelopeRealTimeResponse (or a Fault) out."""
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not self.headers.get("Content-Type", "").startswith("application/soap+xml"):
                return self._fault("Sender", "", "POST a SOAP 1.2 envelope (application/soap+xml)")
            try:
                root = safe_xml.fromstring(body, forbid_dtd=True)
            except (DefusedXmlException, safe_xml.ParseError):
                return self._fault("Sender", "", "the request is not well-formed XML without a DTD")
            request = root.find(f"{{{SOAP_NS}}}Body/{{{CORE_NS}}}COREEnvelopeRealTimeRequest")
            if root.tag != f"{{{SOAP_NS}}}Envelope" or request is None:
                return self._fault("Sender", "", "the Body holds no COREEnvelopeRealTimeRequest")
            fields: dict[str, str] = {}
            for element in request:
                if element.tag not in REQUEST_ELEMENTS or element.tag in fields:  # unqualified, once each
                    return self._fault("Sender", "", f"unexpected element {element.tag}")
                fields[element.tag] = (element.text or "").strip()
            subject = self._certificate_subject()
            if subject is None:
                token = root.find(f"{{{SOAP_NS}}}Header/{{{WSSE_NS}}}Security/{{{WSSE_NS}}}UsernameToken")
                if token is None:
                    return self._fault("Sender", "wsse:InvalidSecurity", "no wsse:Security UsernameToken")
                password = token.find(f"{{{WSSE_NS}}}Password")
                if password is not None and password.get("Type", PASSWORD_TEXT) != PASSWORD_TEXT:
                    return self._fault("Sender", "wsse:UnsupportedSecurityToken", "PasswordText only")
                fields["UserName"] = (token.findtext(f"{{{WSSE_NS}}}Username") or "").strip()
                fields["Password"] = "" if password is None else password.text or ""
            refusal = payer.refusal(fields, subject)
            if refusal is not None and refusal[0] == "UnAuthorized":
                return self._fault("Sender", "wsse:FailedAuthentication", refusal[1])
            if refusal is not None:
                return self._soap_answer(fields, ERROR_TYPE, *refusal)
            payload_type, code, message, payload, payload_id = self._answer(fields["Payload"])
            if code == "Busy":
                return self._fault("Receiver", "cor:Busy", message)
            self._soap_answer(fields, payload_type, code, message, payload=payload, payload_id=payload_id)

        def _soap_answer(
            self,
            request: dict[str, str],
            payload_type: str,
            code: str,
            message: str,
            *,
            payload: str = "",
            payload_id: str | None = None,
        ) -> None:
            fields = self._answer_fields(request, payload_type, code, message, payload, payload_id)
            elements = {name: escape(value) for name, value in fields.items() if value}
            attachments: dict[str, bytes] = {}
            if mtom and payload:  # the 271 moved to a part of its own, the Payload naming it (XOP)
                content_id = f"payload/{uuid.uuid4()}@sandbox.payer"
                attachments[content_id] = payload.encode()
                elements["Payload"] = (
                    f'<xop:Include xmlns:xop="{XOP_NS}" href="cid:{quote(content_id, safe="")}"/>'
                )
            body = "".join(f"<{name}>{value}</{name}>" for name, value in elements.items())
            envelope = (
                f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP_NS}"><env:Body>'
                f'<ns1:COREEnvelopeRealTimeResponse xmlns:ns1="{CORE_NS}">{body}'
                "</ns1:COREEnvelopeRealTimeResponse></env:Body></env:Envelope>"
            )
            self._soap_reply(200, envelope, attachments)

        def _fault(self, code: str, subcode: str, reason: str) -> None:
            """A SOAP 1.2 Fault: HTTP 400 for env:Sender, 500 for env:Receiver (the SOAP 1.2 HTTP binding)."""
            sub = f"<env:Subcode><env:Value>{subcode}</env:Value></env:Subcode>" if subcode else ""
            envelope = (
                f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP_NS}" '
                f'xmlns:wsse="{WSSE_NS}" xmlns:cor="{CORE_NS}"><env:Body><env:Fault>'
                f"<env:Code><env:Value>env:{code}</env:Value>{sub}</env:Code>"
                f'<env:Reason><env:Text xml:lang="en">{escape(reason)}</env:Text></env:Reason>'
                "</env:Fault></env:Body></env:Envelope>"
            )
            status = 500 if code == "Receiver" else 400
            self._soap_reply(status, envelope)

        def _soap_reply(
            self, status: int, envelope: str, attachments: dict[str, bytes] | None = None
        ) -> None:
            """A SOAP 1.2 answer as it is, or with MTOM: the envelope the root of a XOP package, its parts after."""
            if not mtom:
                return self._reply(status, "application/soap+xml; charset=utf-8", envelope.encode())
            boundary, root = f"uuid:{uuid.uuid4()}", "root.message@sandbox.payer"
            xop = 'application/xop+xml; charset=UTF-8; type="application/soap+xml"'
            parts = [
                f"Content-ID: <{root}>\r\nContent-Type: {xop}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".encode()
                + envelope.encode()
            ]
            for content_id, octets in (attachments or {}).items():
                head = f"Content-ID: <{content_id}>\r\nContent-Type: application/octet-stream\r\n"
                parts.append(f"{head}Content-Transfer-Encoding: binary\r\n\r\n".encode() + octets)
            body = b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts)
            content_type = (
                f'multipart/related; type="application/xop+xml"; start="<{root}>"; '
                f'start-info="application/soap+xml"; boundary="{boundary}"'
            )
            self._reply(status, content_type, body + f"--{boundary}--\r\n".encode())

        def _certificate_subject(self) -> str | None:
            """The common name of the client certificate the handshake verified (None: no certificate)."""
            getpeercert = getattr(self.connection, "getpeercert", None)
            certificate = getpeercert() if getpeercert else None
            if not certificate:
                return None
            names = [
                value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"
            ]
            return names[0] if names else ""

        def _envelope(self) -> dict[str, str] | None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            content_type = self.headers.get("Content-Type", "")
            if not content_type.startswith("multipart/form-data"):
                return None
            fields: dict[str, str] = {}

            def on_field(part: Any) -> None:
                fields[part.field_name.decode()] = (part.value or b"").decode("utf-8", "replace")

            def on_file(part: Any) -> None:
                part.file_object.seek(0)
                fields[part.field_name.decode()] = part.file_object.read().decode("utf-8", "replace")

            headers = {"Content-Type": content_type.encode(), "Content-Length": str(len(body)).encode()}
            try:
                python_multipart.parse_form(headers, io.BytesIO(body), on_field, on_file)
            except FormParserError:
                return None
            return fields

        def _core(
            self,
            request: dict[str, str],
            payload_type: str,
            code: str,
            message: str = "None",
            *,
            payload: str = "",
            payload_id: str | None = None,
        ) -> None:
            """Answer in the CORE envelope: the request's PayloadID echoed, sender and receiver swapped."""
            fields = self._answer_fields(request, payload_type, code, message, payload, payload_id)
            boundary = uuid.uuid4().hex
            parts = [
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                for name, value in fields.items()
                if value  # an error envelope leaves out what the request did not give (PayloadID, SenderID)
            ]
            body = ("".join(parts) + f"--{boundary}--\r\n").encode()
            status = HTTP_STATUS.get(code, 400)
            self._reply(status, f"multipart/form-data; boundary={boundary}", body)

        def _answer_fields(
            self,
            request: dict[str, str],
            payload_type: str,
            code: str,
            message: str,
            payload: str,
            payload_id: str | None,
        ) -> dict[str, str]:
            """The answer envelope's fields, in the rule's order: PayloadID echoed, sender and receiver swapped."""
            return {
                "PayloadType": payload_type,
                "ProcessingMode": "RealTime",
                "PayloadID": payload_id or request.get("PayloadID", ""),
                "TimeStamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "SenderID": payer.id,
                "ReceiverID": request.get("SenderID", ""),
                "CORERuleVersion": CORE_RULE_VERSION,
                "Payload": payload,
                "ErrorCode": code,
                "ErrorMessage": message,
            }

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - overrides the stdlib name
            pass

    return Handler


def restrict_tls(context: ssl.SSLContext) -> None:
    """A payer's server of other TLS habits: PAYER_SANDBOX_TLS_MIN_VERSION / _MAX_VERSION (ssl.TLSVersion
    names, e.g. TLSv1_2) and PAYER_SANDBOX_TLS_CIPHERS (an OpenSSL cipher list for TLS 1.2 and older)."""
    with warnings.catch_warnings():  # TLSv1 and TLSv1_1 are deprecated: an outdated payer is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if os.environ.get("PAYER_SANDBOX_TLS_MIN_VERSION"):
            context.minimum_version = ssl.TLSVersion[os.environ["PAYER_SANDBOX_TLS_MIN_VERSION"]]
        if os.environ.get("PAYER_SANDBOX_TLS_MAX_VERSION"):
            context.maximum_version = ssl.TLSVersion[os.environ["PAYER_SANDBOX_TLS_MAX_VERSION"]]
    if os.environ.get("PAYER_SANDBOX_TLS_CIPHERS"):
        context.set_ciphers(os.environ["PAYER_SANDBOX_TLS_CIPHERS"])


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PAYER_SANDBOX_PORT", "8090"))
    config = json.loads(Path(os.environ.get("PAYER_SANDBOX_MEMBERS", MEMBERS_FILE)).read_text())
    mtom = os.environ.get("PAYER_SANDBOX_MTOM", "") not in {"", "0"}
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(Payer(config), mtom=mtom))
    scheme = "http"
    if os.environ.get("PAYER_SANDBOX_TLS_CERT"):
        # HTTPS; with PAYER_SANDBOX_CLIENT_CA, a client certificate from that CA is required (mutual TLS).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.environ["PAYER_SANDBOX_TLS_CERT"], os.environ["PAYER_SANDBOX_TLS_KEY"])
        restrict_tls(context)
        if os.environ.get("PAYER_SANDBOX_CLIENT_CA"):
            context.load_verify_locations(os.environ["PAYER_SANDBOX_CLIENT_CA"])
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"payer sandbox listening on {scheme}://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
