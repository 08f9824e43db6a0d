"""The CAQH CORE envelope (Connectivity Rule vC2.2.0, HTTP MIME multipart) around the X12 connector's 270:
what goes out, how the answer's envelope is read, and what each envelope error becomes. The payer is an
httpx.MockTransport that reads the request with python-multipart, not with the connector's own reader."""

from __future__ import annotations

import io
import json
import ssl
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import python_multipart
from structlog.testing import capture_logs

from services.insurance.core import (
    CoreEnvelopeInvalid,
    CoreLogin,
    answer_payload,
    core_request,
    read_envelope,
)
from services.insurance.settings import InsuranceSettings
from services.insurance.x12 import validate
from services.insurance.x12_connector import Eligibility, X12Connector
from tests.pki import Authority
from tests.unit.test_insurance_x12_answers import ACTIVE, CONNECTOR, COVERAGE, PAYER, PLAN, answer

LOGIN = CoreLogin("reading-group", "s3cret-Pa55word", "SECONDOPINION")
ANSWER_271 = "X12_271_Response_005010X279A1"
Reply = Callable[[dict[str, str]], httpx.Response]


def form(request: httpx.Request) -> dict[str, str]:
    """The request's multipart/form-data fields, read as a payer's web framework would."""
    fields: dict[str, str] = {}

    def on_field(part: Any) -> None:
        fields[part.field_name.decode()] = (part.value or b"").decode()

    def on_file(part: Any) -> None:
        part.file_object.seek(0)
        fields[part.field_name.decode()] = part.file_object.read().decode()

    body = request.read()
    headers = {
        "Content-Type": request.headers["content-type"].encode(),
        "Content-Length": str(len(body)).encode(),
    }
    python_multipart.parse_form(headers, io.BytesIO(body), on_field, on_file)
    return fields


def envelope(status: int = 200, **fields: str) -> httpx.Response:
    """A payer's answer in the CORE envelope (httpx renders it as multipart/form-data)."""
    request = httpx.Request("POST", "http://payer/", data=fields, files={"_": (None, b"")})
    return httpx.Response(
        status, headers={"Content-Type": request.headers["content-type"]}, content=request.read()
    )


def success(request: dict[str, str], payload: str | None = None, **override: str) -> httpx.Response:
    fields = {
        "PayloadType": ANSWER_271,
        "ProcessingMode": "RealTime",
        "PayloadID": request["PayloadID"],
        "TimeStamp": "2026-12-06T12:00:00+00:00",
        "SenderID": "SBX01",
        "ReceiverID": request["SenderID"],
        "CORERuleVersion": "2.2.0",
        "Payload": answer(ACTIVE) if payload is None else payload,
        "ErrorCode": "Success",
        "ErrorMessage": "None",
    }
    return envelope(**{**fields, **override})


def refusal(code: str, status: int, message: str = "refused") -> Reply:
    return lambda request: envelope(
        status,
        PayloadType="CoreEnvelopeError",
        PayloadID=request["PayloadID"],
        ErrorCode=code,
        ErrorMessage=message,
    )


class Payer:
    """A CORE server answering with the replies given (the last one repeats); it keeps what it was sent,
    read by `read` (here the MIME multipart form, as a payer's web framework reads it)."""

    read = staticmethod(form)

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.sent: list[dict[str, str]] = []
        self.raw: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.raw.append(request)
        self.sent.append(self.read(request))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(self.sent[-1])


def check(
    payer: Callable[[httpx.Request], httpx.Response], *, endpoint: str = "http://127.0.0.1:9/core/eligibility"
) -> Eligibility:
    connector = X12Connector(
        PAYER.model_copy(update={"endpoint_url": endpoint}),
        PLAN,
        **CONNECTOR,
        login=LOGIN,
        transport=httpx.MockTransport(payer),
    )
    return connector.check(COVERAGE, "76140")


def test_the_270_goes_out_as_a_core_multipart_envelope() -> None:
    payer = Payer(success)
    assert check(payer).outcome == "active"
    [request], [fields] = payer.raw, payer.sent
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert list(fields) == [
        "PayloadType",
        "ProcessingMode",
        "PayloadID",
        "TimeStamp",
        "UserName",
        "Password",
        "SenderID",
        "ReceiverID",
        "CORERuleVersion",
        "Payload",
    ]
    assert fields["PayloadType"] == "X12_270_Request_005010X279A1"
    assert (fields["ProcessingMode"], fields["CORERuleVersion"]) == ("RealTime", "2.2.0")
    assert (fields["UserName"], fields["Password"]) == ("reading-group", "s3cret-Pa55word")
    assert (fields["SenderID"], fields["ReceiverID"]) == (
        "SECONDOPINION",
        "SBX01",
    )  # ReceiverID: the payer id
    assert uuid.UUID(fields["PayloadID"]).version == 1  # the rule: time and hardware address
    assert datetime.fromisoformat(fields["TimeStamp"]).utcoffset() is not None
    validate(fields["Payload"], "270")
    # The login travels only in the envelope, never in the URL or a header.
    assert "s3cret" not in str(request.url) and "s3cret" not in str(request.headers)


def test_each_attempt_has_its_own_payload_id() -> None:
    payer = Payer(lambda _: httpx.Response(503), success)
    assert check(payer).outcome == "active"
    assert len({fields["PayloadID"] for fields in payer.sent}) == len(payer.sent) == 2


def test_core_request_fields() -> None:
    at = datetime.fromisoformat("2026-12-06T09:30:00-05:00")
    fields = core_request("ISA~", payload_id="p-1", login=LOGIN, receiver_id="SBX01", at=at)
    assert fields["TimeStamp"] == "2026-12-06T09:30:00-05:00"
    assert (fields["PayloadID"], fields["Payload"]) == ("p-1", "ISA~")


def test_a_wrong_login_is_payer_rejected_and_names_the_settings_not_the_password() -> None:
    payer = Payer(refusal("UnAuthorized", 401, message="bad password s3cret-Pa55word for SBX-MET"))
    with capture_logs() as logs:
        eligibility = check(payer)
    assert (eligibility.outcome, eligibility.standing) == ("payer_rejected", "rejected")
    assert "refused our CAQH CORE login (UnAuthorized)" in eligibility.detail
    assert "INSURANCE_CORE_PASSWORD" in eligibility.detail and "INSURANCE_CORE_USERNAME" in eligibility.detail
    assert "s3cret" not in eligibility.detail and "SBX-MET" not in eligibility.detail
    assert "s3cret" not in repr(logs) and "SBX-MET" not in repr(logs)
    assert len(payer.sent) == 1  # a refused login is not retried


@pytest.mark.parametrize(
    "reply",
    [
        refusal("Sender/ReceiverNotAuthorized", 403),
        lambda _: httpx.Response(401, text="Unauthorized"),  # no envelope: the HTTP status says it
        lambda _: httpx.Response(403),
    ],
)
def test_every_login_refusal_is_a_credentials_problem(reply: Reply) -> None:
    eligibility = check(Payer(reply))
    assert eligibility.outcome == "payer_rejected"
    assert "check INSURANCE_CORE_USERNAME" in eligibility.detail


def test_other_envelope_errors_are_payer_rejected_with_their_code_only() -> None:
    payer = Payer(refusal("VersionMismatch", 400, message="we speak 4.0.0, patient SBX-MET"))
    eligibility = check(payer)
    assert eligibility.outcome == "payer_rejected"
    assert "refused our CAQH CORE envelope (VersionMismatch)" in eligibility.detail
    assert "SBX-MET" not in eligibility.detail and "4.0.0" not in eligibility.detail
    assert len(payer.sent) == 1
    odd = check(Payer(refusal("Member SBX-MET unknown", 400)))
    assert odd.outcome == "payer_rejected" and "SBX-MET" not in odd.detail


@pytest.mark.parametrize(
    "reply",
    [
        lambda _: httpx.Response(503),
        lambda _: httpx.Response(500, text="<html>oops</html>"),
        refusal("Busy", 200),
    ],
)
def test_transient_failures_are_retried_then_payer_unavailable(reply: Reply) -> None:
    payer = Payer(reply)
    eligibility = check(payer)
    assert eligibility.outcome == "payer_unavailable"
    assert "after 3 attempts" in eligibility.detail
    assert len(payer.sent) == 3


def test_a_payer_that_cannot_be_reached_is_payer_unavailable() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    eligibility = check(refused)
    assert eligibility.outcome == "payer_unavailable"
    assert "cannot connect (ConnectError)" in eligibility.detail


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (lambda r: success(r, PayloadID=str(uuid.uuid4())), "PayloadID is not the one we sent"),
        (lambda r: success(r, PayloadType="X12_277_Response_005010X212"), "PayloadType is X12_277"),
        (lambda r: success(r, payload=""), "no Payload"),
        (lambda r: success(r, ErrorCode=""), "no ErrorCode"),
        (lambda r: httpx.Response(200, text=answer(ACTIVE)), "not MIME multipart"),  # a bare 271
        (lambda r: httpx.Response(404, text="not here"), "HTTP 404 without a CORE envelope"),
        (lambda r: envelope(400, ErrorCode="Success"), "HTTP 400 with ErrorCode Success"),
    ],
)
def test_an_answer_that_is_no_envelope_for_our_request_is_malformed(reply: Reply, why: str) -> None:
    eligibility = check(Payer(reply))
    assert eligibility.outcome == "malformed_response"
    assert "did not answer with a valid CAQH CORE envelope" in eligibility.detail
    assert why in eligibility.detail


def test_a_garbled_payload_in_a_good_envelope_is_a_malformed_271() -> None:
    eligibility = check(Payer(lambda r: success(r, payload="ISA*this is not an interchange~")))
    assert eligibility.outcome == "malformed_response"
    assert "sent a 271 that is not valid" in eligibility.detail


def test_a_999_in_the_envelope_is_the_payer_refusing_our_270() -> None:
    ta1 = (
        "ISA*00*          *00*          *ZZ*SBX01          *ZZ*SECONDOPINION  *261206*1200*^*00501*000000017*0*P*:~"
        "TA1*000000017*261206*1200*R*025~IEA*0*000000017~"
    )
    eligibility = check(Payer(lambda r: success(r, payload=ta1, PayloadType="X12_TA1_Response_00501X231A1")))
    assert eligibility.outcome == "payer_rejected"


def test_field_names_are_read_without_regard_to_case() -> None:
    # Some clearinghouses write PayloadId / SenderId; the values are what count.
    def reply(request: dict[str, str]) -> httpx.Response:
        return envelope(
            PayloadType=ANSWER_271,
            PayloadId=request["PayloadID"],
            Payload=answer(ACTIVE),
            errorcode="Success",
        )

    assert check(Payer(reply)).outcome == "active"


def test_an_endpoint_that_is_not_http_is_payer_unknown() -> None:
    eligibility = check(Payer(success), endpoint="ftp://payer.example/eligibility")
    assert eligibility.outcome == "payer_unknown"
    assert "not an http(s) URL" in eligibility.detail


def test_reading_an_envelope() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="PayloadID"\r\n\r\nabc\r\n'
        b'--b\r\nContent-Disposition: form-data; name="Payload"; filename="271.x12"\r\n'
        b"Content-Type: application/EDI-X12\r\n\r\nISA*00~\r\nGS*HB~\r\n--b--\r\n"
    )
    assert read_envelope('multipart/form-data; boundary="b"', body) == {
        "PayloadID": "abc",
        "Payload": "ISA*00~\r\nGS*HB~",
    }
    with pytest.raises(CoreEnvelopeInvalid, match="cut short"):
        read_envelope("multipart/form-data; boundary=b", body[:-8])
    with pytest.raises(CoreEnvelopeInvalid, match="comes twice"):
        read_envelope("multipart/form-data; boundary=b", body.replace(b'name="Payload"', b'name="payloadid"'))
    with pytest.raises(CoreEnvelopeInvalid, match="not MIME multipart"):
        answer_payload(200, "application/EDI-X12", b"ISA*00~", "abc")


def test_the_password_never_shows_in_a_repr() -> None:
    assert "s3cret" not in repr(LOGIN)
    settings = InsuranceSettings(core_password="s3cret-Pa55word")  # type: ignore[arg-type]
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert CoreLogin.of(settings).password == "s3cret-Pa55word"


def test_the_default_login_is_the_payer_sandboxs() -> None:
    # `make demo` starts the sandbox and the services without any INSURANCE_CORE_* setting: they must agree.
    core = json.loads((Path(__file__).parents[1] / "payer_sandbox" / "members.json").read_text())["payer"][
        "core"
    ]
    defaults = {name: spec.default for name, spec in InsuranceSettings.model_fields.items()}
    assert defaults["core_username"] == core["username"]
    assert defaults["core_password"].get_secret_value() == core["password"]
    assert defaults["core_sender_id"] in core["sender_ids"]


def test_an_x509_login_sends_no_username_or_password(tmp_path: Path) -> None:
    # CORE §4.1: with a client certificate the TLS handshake says who we are; the envelope carries no login.
    issued = Authority(tmp_path, "clearinghouse").issue("reading-group")
    login = CoreLogin("reading-group", "s3cret-Pa55word", "SECONDOPINION", str(issued.cert), str(issued.key))
    payer = Payer(success)
    https = PAYER.model_copy(update={"endpoint_url": "https://payer.example/core"})
    connector = X12Connector(https, PLAN, **CONNECTOR, login=login, transport=httpx.MockTransport(payer))
    assert connector.check(COVERAGE, "76140").outcome == "active"
    [fields] = payer.sent
    assert "UserName" not in fields and "Password" not in fields
    assert (fields["SenderID"], fields["ReceiverID"]) == ("SECONDOPINION", "SBX01")


def test_each_payer_may_have_a_login_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "INSURANCE_CORE_LOGINS",
        json.dumps(
            {
                "BCBS": {"client_cert": "/s/bcbs.crt", "client_key": "/s/bcbs.key"},
                "AETNA": {"username": "rg-aetna", "password": "aetna-Pa55", "sender_id": "RG77"},
            }
        ),
    )
    monkeypatch.setenv("INSURANCE_CORE_PASSWORD", "default-Pa55")
    settings = InsuranceSettings()
    bcbs, aetna, other = (CoreLogin.of(settings, payer) for payer in ("BCBS", "AETNA", "SBX01"))
    assert (bcbs.x509, bcbs.client_cert, bcbs.client_key, bcbs.sender_id) == (
        True,
        "/s/bcbs.crt",
        "/s/bcbs.key",
        "SECONDOPINION",  # not given for BCBS: the default's
    )
    assert (aetna.x509, aetna.username, aetna.password, aetna.sender_id) == (
        False,
        "rg-aetna",
        "aetna-Pa55",
        "RG77",
    )
    assert (other.x509, other.username, other.password) == (False, "secondopinion", "default-Pa55")
    assert "aetna-Pa55" not in repr(settings) and "aetna-Pa55" not in repr(aetna)
    # A payer with a password of its own does not inherit a default certificate, and the other way round.
    with_cert = InsuranceSettings(
        core_client_cert="/s/rg.crt", core_client_key="/s/rg.key", core_logins=settings.core_logins
    )
    assert CoreLogin.of(with_cert, "AETNA").x509 is False
    assert CoreLogin.of(with_cert, "SBX01").client_cert == "/s/rg.crt"


@pytest.mark.parametrize(
    "values",
    [
        {"core_client_cert": "/s/rg.crt"},
        {"core_logins": {"BCBS": {"client_key": "/s/bcbs.key"}}},
    ],
    ids=["default", "per-payer"],
)
def test_a_certificate_without_its_key_is_refused_at_start(values: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="needs both the client certificate and its private key"):
        InsuranceSettings.model_validate(values)


def test_an_x509_login_is_never_used_over_plain_http(tmp_path: Path) -> None:
    # No certificate goes over http, and the envelope carries no password: the 270 would go out unauthenticated.
    issued = Authority(tmp_path, "clearinghouse").issue("reading-group")
    login = CoreLogin("reading-group", "", "SECONDOPINION", str(issued.cert), str(issued.key))
    payer = Payer(success)
    connector = X12Connector(
        PAYER.model_copy(update={"endpoint_url": "http://payer.example/core"}),
        PLAN,
        **CONNECTOR,
        login=login,
        transport=httpx.MockTransport(payer),
    )
    checked = connector.check(COVERAGE, "76140")
    assert checked.outcome == "payer_rejected" and "is not https" in checked.detail
    assert payer.sent == []


class HandshakeRefused:
    """A payer whose TLS server ends every handshake with `reason` (an OpenSSL reason, as ssl raises it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.attempts = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        alert = ssl.SSLError(1, f"[SSL: {self.reason}] {self.reason.lower()}")
        alert.reason = self.reason
        raise httpx.ConnectError("handshake failed", request=request) from alert


@pytest.mark.parametrize("reason", ["TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"])
def test_a_tls_version_mismatch_is_payer_rejected_not_retried_and_not_called_a_login(reason: str) -> None:
    payer = HandshakeRefused(reason)
    eligibility = check(payer)
    assert (eligibility.outcome, eligibility.standing) == ("payer_rejected", "rejected")
    assert "was not sent, and not retried" in eligibility.detail
    assert (
        f"refused our handshake (TLS {reason}: we share no TLS version or cipher suite" in eligibility.detail
    )
    assert "ask the payer which TLS versions and cipher suites" in eligibility.detail
    assert "login (" not in eligibility.detail
    assert payer.attempts == 1


def test_a_handshake_failure_this_python_cannot_place_names_both_causes_and_is_not_retried() -> None:
    # Over a transport whose handshake cannot be watched, handshake_failure may be a refused (or missing)
    # client certificate or a cipher / version mismatch: the detail names both and the settings of each.
    payer = HandshakeRefused("SSLV3_ALERT_HANDSHAKE_FAILURE")
    eligibility = check(payer)
    assert eligibility.outcome == "payer_rejected"
    assert "cannot see at which step" in eligibility.detail
    assert (
        "INSURANCE_CORE_USERNAME" in eligibility.detail and "may require an X.509 login" in eligibility.detail
    )
    assert "share no TLS version or cipher suite" in eligibility.detail
    assert payer.attempts == 1


def test_an_internal_error_alert_is_the_payers_trouble_and_retried() -> None:
    payer = HandshakeRefused("TLSV1_ALERT_INTERNAL_ERROR")
    eligibility = check(payer)
    assert eligibility.outcome == "payer_unavailable" and "after 3 attempts" in eligibility.detail
    assert payer.attempts == 3


def test_outside_development_a_password_login_is_never_sent_over_plain_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.common.config import Settings
    from services.insurance import x12_connector

    monkeypatch.setattr(x12_connector, "get_settings", lambda: Settings(env="prod"))
    payer = Payer(success)
    checked = check(payer)  # the default test payer's endpoint is http
    assert checked.outcome == "payer_rejected" and "is not https" in checked.detail
    assert payer.sent == []  # neither the password nor the member's data left


def test_an_answer_larger_than_the_bound_is_not_read_whole() -> None:
    from services.insurance.core_soap import MAX_ANSWER_BYTES

    def flood(request: httpx.Request) -> httpx.Response:
        chunks = (b"x" * 1_048_576 for _ in range(MAX_ANSWER_BYTES // 1_048_576 + 2))
        return httpx.Response(
            200, headers={"content-type": "multipart/form-data; boundary=b"}, content=chunks
        )

    checked = check(flood)
    assert checked.outcome == "malformed_response" and "larger than" in checked.detail
