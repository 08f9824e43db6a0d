"""The X12 connector: a 270 sent to the payer in a CAQH CORE envelope, its 271 read into terms.

The transport is the CAQH CORE Connectivity Rule vC2.2.0 in the envelope standard the payer's server speaks
(`insurance_payers.core_envelope`). `mime` (the default): a `multipart/form-data` POST with PayloadType
`X12_270_Request_005010X279A1`, ProcessingMode `RealTime`, PayloadID (a UUID), TimeStamp, UserName,
Password and SenderID (the `INSURANCE_CORE_*` settings, or the payer's own in `INSURANCE_CORE_LOGINS`),
ReceiverID (the payer's `payer_id`), CORERuleVersion `2.2.0` and the 270 as Payload. `soap`: the same
fields as a SOAP 1.2 `COREEnvelopeRealTimeRequest` (the WSDL's `RealTimeTransaction`), with UserName and
Password moved to a WS-Security UsernameToken in the SOAP Header (`core_soap`). With an X.509 login the
client certificate is presented in the TLS handshake instead, and the envelope carries no UserName or
Password (no UsernameToken). The answer comes back in the same envelope standard (a SOAP answer perhaps with
MTOM: the envelope in a XOP package, the 271 in a part of its own, `core_xop`): it must echo our PayloadID
and carry ErrorCode `Success` with a 271 (or the 999 / TA1 with which the payer refuses the 270 itself); a
SOAP Fault counts like the ErrorCode it stands for. The HTTP status counts only when an answer has no
envelope.

`check()` never raises; each failure becomes a specific outcome::

    PayerBusy              timeout, refused connection, HTTP 5xx, CORE `Busy`, a SOAP env:Receiver fault,
                           AAA 42: retried with exponential backoff up to `payer_attempts`, then
                           `payer_unavailable`
    CoreRefused            the envelope's ErrorCode is an error (VersionMismatch, PayloadIDRequired, ...):
                           `payer_rejected`
      + CoreLoginRefused   UnAuthorized, Sender/ReceiverNotAuthorized, a SOAP fault wsse:FailedAuthentication
                           (or another WS-Security token fault), HTTP 401/403 without an envelope, a TLS
                           alert refusing our client certificate, or handshake_failure after the server
                           asked for one (`core_tls`): `payer_rejected`, naming the settings
    CoreLoginUnusable      our certificate or key cannot be loaded, or the payer's server certificate is
                           not trusted: `payer_rejected`, naming the settings; nothing was sent
    CoreTlsRefused         no TLS version or cipher suite in common with the payer's server (protocol_version,
                           or handshake_failure before it asked for any certificate; where this Python cannot
                           see which, the detail names both): `payer_rejected`, not retried
    CoreEnvelopeInvalid    not a CORE envelope answering our request (no multipart body or SOAP 1.2
                           envelope, XML with a DTD, an MTOM package whose xop:Include names no part it
                           carries, no ErrorCode, another PayloadID or PayloadType): `malformed_response`
    X12Invalid             a Payload that is not a valid 271: `malformed_response`
      + X12Acknowledged    a TA1 or 999 instead of the 271: `payer_rejected`

The password, the payer's free-text ErrorMessage and member data never reach a log or a detail: logs
carry the payer id, the PayloadID and the ErrorCode.
"""

from __future__ import annotations

import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import structlog

from contracts.models import Coverage, Patient
from services.common.config import get_settings
from services.insurance.connectors import ZERO, Eligibility, PlanStanding
from services.insurance.core import (
    CoreEnvelopeInvalid,
    CoreLogin,
    CoreLoginRefused,
    CoreLoginUnusable,
    CoreRefused,
    CoreTlsRefused,
    PayerBusy,
    answer_payload,
    core_request,
)
from services.insurance.core_soap import CONTENT_TYPE as SOAP_CONTENT_TYPE
from services.insurance.core_soap import MAX_ANSWER_BYTES, soap_answer_payload, soap_request
from services.insurance.core_tls import Handshake, client_context, tls_refusal
from services.insurance.models import InsurancePayer, InsurancePlan
from services.insurance.settings import get_insurance_settings
from services.insurance.x12 import (
    Benefit,
    EligibilityResponse,
    Inquiry,
    Party,
    Rejection,
    X12Acknowledged,
    X12Invalid,
    build_270,
    parse_271,
)

log = structlog.get_logger(__name__)

REQUEST_TYPE = "X12_270_Request_005010X279A1"
# AAA03 reject reasons: the member does not match, and the payer's momentary unavailability.
MEMBER_REASONS = {"58", "64", "65", "67", "71", "72", "73", "75", "76"}
TRANSIENT_REASONS = {"42", "80"}
# EB01 coverage status codes (005010X279A1 2110C): 1-5 active (in various forms), 6-8 inactive.
ACTIVE_CODES = {"1", "2", "3", "4", "5"}
INACTIVE_CODES = {"6", "7", "8"}
# EB03 values that apply to a second-opinion read: what we asked (EQ01), the plan as a whole (30), or unsaid.
RELEVANT_TYPES = {"4", "98", "30"}
NO_RESUBMIT = {"N", "S", "Y"}  # AAA04 follow-up actions that forbid sending the inquiry again
REASON_TEXT = {
    "04": "authorized quantity exceeded",
    "41": "authorization/access restrictions",
    "42": "unable to respond at current time",
    "43": "invalid or missing provider identification",
    "51": "provider not on file",
    "58": "invalid or missing date of birth",
    "71": "patient birth date does not match",
    "72": "invalid or missing member id",
    "73": "invalid or missing subscriber name",
    "75": "subscriber not found",
    "76": "duplicate member id",
    "79": "invalid participant identification (payer id)",
    "80": "no response received",
}


@dataclass(frozen=True)
class Subscriber:
    last_name: str = ""
    first_name: str = ""
    birth_date: str = ""  # YYYYMMDD
    gender: str = ""  # F, M or U

    @classmethod
    def of(cls, patient: Patient | None) -> Subscriber:
        if patient is None:
            return cls()
        gender = {"female": "F", "male": "M"}.get(patient.sex.value, "U")
        return cls(patient.family_name, patient.given_name, patient.birth_date.strftime("%Y%m%d"), gender)


class X12Connector:
    def __init__(
        self,
        payer: InsurancePayer,
        plan: InsurancePlan,
        *,
        provider: Party,
        network: str,
        allowed_amount: Decimal | None,
        trace: str,
        attempts: int = 3,
        backoff_seconds: float = 0.5,
        subscriber: Subscriber | None = None,
        sleep: Callable[[float], None] = time.sleep,
        usage: str = "T",
        login: CoreLogin | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.usage = usage
        self.login = login or CoreLogin.of(get_insurance_settings(), payer.payer_id)
        self.transport = transport  # tests hand in an httpx.MockTransport
        self.payer = payer
        self.plan = plan
        self.provider = provider
        self.network = network
        self.allowed_amount = allowed_amount
        self.trace = trace
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        self.subscriber = subscriber or Subscriber()
        self.sleep = sleep

    def check(self, coverage: Coverage, cpt: str) -> Eligibility:
        member_id = (coverage.member_id or "").strip()
        if not member_id:
            return self._refused("member_mismatch", "no member id was given, so the payer cannot be asked")
        if not self.payer.endpoint_url:
            return self._refused(
                "payer_unknown", f"payer {self.payer.payer_id} has no endpoint configured for X12 eligibility"
            )
        if not _http_url(self.payer.endpoint_url):
            return self._refused(
                "payer_unknown",
                f"payer {self.payer.payer_id}'s endpoint_url is not an http(s) URL; fix it in insurance_payers",
            )
        for attempt in range(1, self.attempts + 1):
            try:  # a new ISA13/GS06 each attempt: a resent control number is a duplicate (TA1 025)
                request = self._inquiry(member_id)
            except X12Invalid:
                return self._refused(
                    "member_mismatch", "the member id has characters an X12 270 cannot carry; check the card"
                )
            try:
                return self._read(self._post(request), member_id)
            except PayerBusy as exc:
                log.warning("payer.busy", payer_id=self.payer.payer_id, attempt=attempt, reason=str(exc))
                if attempt == self.attempts:
                    return self._refused(
                        "payer_unavailable",
                        f"payer {self.payer.payer_id} did not give an answer after {attempt} attempts "
                        f"({exc}); verification is retried when insurance.verify is sent again",
                    )
                self.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            except CoreLoginRefused as exc:
                return self._refused(
                    "payer_rejected",
                    f"payer {self.payer.payer_id} refused our CAQH CORE login ({exc}); check "
                    f"{self.login.settings_named} against what the payer or clearinghouse issued, and that "
                    "it knows us as a sender to this payer",
                )
            except CoreLoginUnusable as exc:
                return self._refused(
                    "payer_rejected", f"the 270 to payer {self.payer.payer_id} was not sent: {exc}"
                )
            except CoreTlsRefused as exc:
                return self._refused(
                    "payer_rejected",
                    f"the 270 to payer {self.payer.payer_id} was not sent, and not retried: the payer's TLS "
                    f"server refused our handshake ({exc})",
                )
            except CoreRefused as exc:
                return self._refused(
                    "payer_rejected",
                    f"payer {self.payer.payer_id} refused our CAQH CORE envelope ({exc}); the 270 was not read",
                )
            except CoreEnvelopeInvalid as exc:
                return self._refused(
                    "malformed_response",
                    f"payer {self.payer.payer_id} did not answer with a valid CAQH CORE envelope ({exc})",
                )
            except X12Acknowledged as exc:
                return self._refused(
                    "payer_rejected", f"payer {self.payer.payer_id} refused our 270 at the envelope ({exc})"
                )
            except X12Invalid as exc:
                return self._refused(
                    "malformed_response", f"payer {self.payer.payer_id} sent a 271 that is not valid ({exc})"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _inquiry(self, member_id: str) -> str:
        return build_270(
            Inquiry(
                payer=Party(self.payer.name.upper(), self.payer.payer_id),
                provider=self.provider,
                member_id=member_id,
                trace=self.trace[:50],
                control_number=secrets.randbelow(10**9 - 1) + 1,
                subscriber_last_name=self.subscriber.last_name,
                subscriber_first_name=self.subscriber.first_name,
                subscriber_birth_date=self.subscriber.birth_date,
                subscriber_gender=self.subscriber.gender,
                usage=self.usage,
            )
        )

    def _post(self, request: str) -> str:
        """Send the 270 in a CORE envelope; the 271 (or 999 / TA1) the answer's envelope carries."""
        payload_id = str(uuid.uuid1())  # the rule: an RFC 4122 UUID from time and hardware address
        soap = self.payer.core_envelope == "soap"
        body = self._envelope(request, payload_id)
        handshake = Handshake()
        verify = self._tls(handshake)
        try:
            with (
                httpx.Client(
                    transport=self.transport, timeout=self.payer.timeout_seconds, verify=verify
                ) as client,
                client.stream("POST", self.payer.endpoint_url or "", **body) as response,
            ):
                content = _bounded(response)
        except httpx.TimeoutException as exc:
            raise PayerBusy(f"no answer within {self.payer.timeout_seconds:g} s") from exc
        except httpx.TransportError as exc:
            refusal = tls_refusal(exc, self.login, handshake)
            if refusal is not None:
                log.warning("payer.tls_refused", payer_id=self.payer.payer_id, reason=str(refusal))
                raise refusal from exc
            raise PayerBusy(f"cannot connect ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise CoreEnvelopeInvalid(f"the answer cannot be read ({type(exc).__name__})") from exc
        content_type = response.headers.get("content-type", "")
        read = soap_answer_payload if soap else answer_payload
        try:
            return read(response.status_code, content_type, content, payload_id)
        except (CoreRefused, CoreEnvelopeInvalid) as exc:
            event = "payer.core_refused" if isinstance(exc, CoreRefused) else "payer.core_envelope_invalid"
            log.warning(
                event,
                payer_id=self.payer.payer_id,
                payload_id=payload_id,
                envelope=self.payer.core_envelope,
                http_status=response.status_code,
                reason=str(exc),
            )
            raise

    def _envelope(self, request: str, payload_id: str) -> dict[str, Any]:
        """The POST of the 270 in the CORE envelope standard the payer speaks (`core_envelope`)."""
        login, receiver_id, at = self.login, self.payer.payer_id, datetime.now(UTC)
        if self.payer.core_envelope == "soap":
            envelope = soap_request(
                request, payload_id=payload_id, login=login, receiver_id=receiver_id, at=at
            )
            return {"content": envelope, "headers": {"Content-Type": SOAP_CONTENT_TYPE}}
        fields = core_request(request, payload_id=payload_id, login=login, receiver_id=receiver_id, at=at)
        payload = fields.pop("Payload").encode("ascii")
        return {"data": fields, "files": {"Payload": (None, payload)}}

    def _tls(self, handshake: Handshake) -> ssl.SSLContext | bool:
        """The TLS settings of the POST (`core_tls`); `handshake` watches what the payer's server sends."""
        plain = not (self.payer.endpoint_url or "").lower().startswith("https://")
        # Over plain HTTP the login (a password, or no certificate at all) and the 270 with the member's data
        # would go out in clear: only a development machine's sandbox is spoken to that way.
        if plain and (self.login.x509 or get_settings().env != "dev"):
            raise CoreLoginUnusable(
                f"payer {self.payer.payer_id}'s endpoint_url is not https: CAQH CORE is spoken over TLS only "
                "(plain http is for a development sandbox); set it to the payer's https URL"
            )
        return True if plain else client_context(self.login, handshake)

    def _read(self, document: str, member_id: str) -> Eligibility:
        answer = parse_271(document)
        if any(r.reason in TRANSIENT_REASONS and r.follow_up not in NO_RESUBMIT for r in answer.rejections):
            raise PayerBusy("AAA 42: unable to respond at current time")
        if answer.rejections:
            return self._rejected(answer.rejections)
        if self.trace[:50] not in answer.traces:
            raise X12Invalid("the 271 does not echo this inquiry's trace number (TRN01 = 2)")
        if answer.member_id and member_id not in {answer.member_id, answer.prior_member_id}:
            return self._refused("member_mismatch", "the 271 is about another member id than the one asked")
        return self._eligibility(answer)

    def _rejected(self, rejections: tuple[Rejection, ...]) -> Eligibility:
        reasons = ", ".join(f"AAA {r.reason} {REASON_TEXT.get(r.reason, 'rejected')}" for r in rejections)
        if any(r.reason in MEMBER_REASONS for r in rejections):
            return self._refused(
                "member_mismatch",
                f"the payer does not recognise the member as given ({reasons}); "
                "check the member id and name on the insurance card",
            )
        return self._refused(
            "payer_rejected", f"payer {self.payer.payer_id} rejected the inquiry ({reasons})"
        )

    def _eligibility(self, answer: EligibilityResponse) -> Eligibility:
        relevant = [b for b in answer.benefits if _applies(b)]
        # EB02 on a status row is the member's coverage tier (IND, FAM, EMP, ...): any tier counts.
        status = [
            b for b in answer.benefits if b.code in ACTIVE_CODES | INACTIVE_CODES and _applies(b, tier=False)
        ]
        if not status:
            raise X12Invalid("the 271 gives no coverage status (EB01 1-8) for the plan or the service asked")
        active = any(b.code in ACTIVE_CODES for b in status)
        excluded = any(b.code == "I" and set(b.service_types) & {"4", "98"} for b in answer.benefits)
        # Out of network (or not known to be in it) the payer's out-of-network terms apply.
        flag = "Y" if self.network == "in" else "N"
        # The most specific service type first: a 4 or 98 row wins over the plan-wide 30.
        terms = sorted(
            (b for b in relevant if b.in_network in {flag, "W", ""} and b.code in {"A", "B", "C"}),
            key=lambda b: "30" in b.service_types or not b.service_types,
        )
        deductible = _amount(terms, "C", "23")
        remaining = _amount(terms, "C", "29")
        eb11 = any(b.authorization_required for b in relevant)
        rule = self.plan.authorization_rule
        if rule == "none" and eb11:
            rule = "prior_auth"
        return Eligibility(
            plan_code=self.plan.code,
            standing=PlanStanding.ACTIVE if active else PlanStanding.INACTIVE,
            plan_name=next((b.plan_name for b in status if b.plan_name), "") or self.plan.plan_name,
            covers_service=active and not excluded,
            network=self.network,
            copay=_amount(terms, "B", "") or ZERO,
            coinsurance_pct=next((b.percent for b in terms if b.code == "A" and b.percent is not None), ZERO),
            deductible=deductible or ZERO,
            deductible_met=None
            if deductible is None or remaining is None
            else max(ZERO, deductible - remaining),
            allowed_amount=self.allowed_amount,
            authorization_rule=rule,
            outcome="active" if active else "inactive",
        )

    def _refused(self, outcome: str, detail: str) -> Eligibility:
        return Eligibility(
            plan_code=self.plan.code,
            standing=PlanStanding.REJECTED,
            plan_name=self.plan.plan_name,
            network=self.network,
            outcome=outcome,
            detail=detail,
        )


def _http_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in {"http", "https"} and bool(parsed.host)


def _applies(b: Benefit, tier: bool = True) -> bool:
    """An EB row about the individual (not the family) and about this service or the plan as a whole."""
    individual = not tier or b.coverage_level in {"IND", ""}
    return individual and (not b.service_types or bool(set(b.service_types) & RELEVANT_TYPES))


def _amount(benefits: list[Benefit], code: str, period: str) -> Decimal | None:
    for b in benefits:
        if b.code == code and (not period or b.time_period == period) and b.amount is not None:
            return b.amount
    return None


def _bounded(response: httpx.Response) -> bytes:
    """The answer's body, read no further than MAX_ANSWER_BYTES (a payer cannot fill our memory)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise CoreEnvelopeInvalid(f"the answer is larger than {MAX_ANSWER_BYTES} bytes; it was not read")
        chunks.append(chunk)
    return b"".join(chunks)
