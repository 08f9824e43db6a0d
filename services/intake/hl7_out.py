"""The integrated report to a partner's HL7 v2 interface engine: ORU^R01 over MLLP, from a durable outbox.

- `queue` writes one `Hl7Message` per enabled endpoint of the case's partner in the transaction that delivers
  the report (handlers.deliver_report): result status F for the first delivery, C for each later version (an
  answer to a question, an addendum). A crash after that commit loses nothing: the row is sent after it.
- MSH-10 (the control id) is derived from the endpoint and the delivering command, so it is the same on every
  attempt and replay; a receiver dedupes on it. MSH-7 is when the row was queued.
- `Hl7Sender` claims due rows with a lease (FOR UPDATE SKIP LOCKED, so replicas share the work), each
  endpoint's in the order they were queued (a later version waits for the earlier one's retry), so at most one
  of an endpoint's at a time, each sent on a lane of its own (up to LANES at once): an engine that never
  answers holds its own lane until the timeout, not the other engines' messages. The sender reads the
  report from the review service as the case API links it (the FHIR DiagnosticReport for the conclusion and
  the interpreter, the signed PDF), builds the message (hl7_oru) once, at its first attempt, keeps it on the row
  (`payload`: every retry and replay sends the same bytes, however the report changed since), and sends it over
  MLLP (python-hl7's asyncio client), to the address checked by the webhook sender's rules (webhooks_out.check_url: public addresses
  only, loopback in development), over TLS checked against the same CAs, with the host as server name.
- The ACK decides (MSA-1, with MSA-2 our control id; an answer naming another control id is ignored): AA or CA
  is delivered; AE or CE, no ACK within `timeout`, a closed connection, a refused one, are retried on the
  webhook sender's schedule (RETRY_SCHEDULE, MAX_ATTEMPTS, then `failed`, replayable); AR or CR (rejected)
  is retried too, and logged as the warning `hl7.message_rejected` (and counted in
  `hl7_oru_attempts_total{outcome="rejected"}`) for operations to alert on.
- Every attempt is recorded (`Hl7Attempt`) with the ACK code and what failed, never the receiver's text nor
  anything of the message: the logs carry ids and codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import random
import re
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import structlog
from hl7.mllp import InvalidBlockError, open_hl7_connection
from prometheus_client import Counter
from sqlalchemy import and_, exists, insert, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common.db import insert_new
from services.intake import hl7_oru
from services.intake.host_lookup import DNS_TIMEOUT, EndpointRefused, resolve_host
from services.intake.models import (
    Case,
    CaseCreate,
    CaseTimelineEntry,
    Hl7Attempt,
    Hl7Endpoint,
    Hl7Message,
)
from services.intake.webhooks_out import MAX_ATTEMPTS, backoff, check_url

log = structlog.get_logger(__name__)

LEASE = timedelta(minutes=5)
BATCH = 5  # messages claimed per pass of `run_once`: sent at the same time, each ends well within the lease
LANES = 8  # messages (so endpoints: one of an endpoint's at a time) `run_forever` sends at the same time
ACK_LIMIT = 64 * 1024  # bytes of an answer read for its ACK; a longer block is not an ACK
ATTEMPTS = Counter("hl7_oru_attempts_total", "ORU^R01 sends by outcome", ["outcome"])


class ReportUnavailable(Exception):
    """The report could not be read from the review service; the message says what to check."""


def control_id(endpoint_id: str, source_event_id: str) -> str:
    """MSH-10 (ST, at most 20 characters): the same for the same endpoint and delivery, on every attempt."""
    return "SO" + hashlib.sha256(f"{endpoint_id}|{source_event_id}".encode()).hexdigest()[:18].upper()


def queue(
    session: Session,
    case: Case,
    source_event_id: str,
    *,
    report_id: str,
    pdf_url: str,
    fhir_url: str,
    amended: bool,
) -> int:
    """Queue the report for every enabled HL7 endpoint of the case's partner (in the delivery's transaction).
    A redelivered command queues nothing new (the insert skips a row already there)."""
    endpoints = session.exec(
        select(Hl7Endpoint).where(
            Hl7Endpoint.partner_id == case.partner_id, col(Hl7Endpoint.disabled_at).is_(None)
        )
    ).all()
    insert_new(
        session,
        [
            Hl7Message(
                id=control_id(endpoint.id, source_event_id),
                endpoint_id=endpoint.id,
                source_event_id=source_event_id,
                case_id=case.id,
                report_id=report_id,
                result_status="C" if amended else "F",
                pdf_url=pdf_url,
                fhir_url=fhir_url,
            )
            for endpoint in endpoints
        ],
    )
    return len(endpoints)


@dataclass(frozen=True)
class Attempt:
    message_id: str
    case_id: str
    endpoint_id: str
    ack_code: str | None
    error: str
    duration_ms: int
    at: datetime


_MESSAGE = Hl7Message.__table__  # type: ignore[attr-defined]
_ENDPOINT = Hl7Endpoint.__table__  # type: ignore[attr-defined]
_EARLIER = _MESSAGE.alias("earlier")


def _due_query(now: datetime, batch: int) -> Any:
    """Due, and the first pending message of its endpoint (a later version waits for the earlier one's
    retry), oldest first; leased rows are skipped, not waited for."""
    return (
        core_select(_MESSAGE.c.id)
        .join(_ENDPOINT, _ENDPOINT.c.id == _MESSAGE.c.endpoint_id)
        .where(
            _MESSAGE.c.status == "pending",
            _MESSAGE.c.next_attempt_at <= now,
            _ENDPOINT.c.disabled_at.is_(None),
            ~exists().where(
                _EARLIER.c.endpoint_id == _MESSAGE.c.endpoint_id,
                _EARLIER.c.status == "pending",
                or_(
                    _EARLIER.c.created_at < _MESSAGE.c.created_at,
                    and_(_EARLIER.c.created_at == _MESSAGE.c.created_at, _EARLIER.c.id < _MESSAGE.c.id),
                ),
            ),
        )
        .order_by(_MESSAGE.c.next_attempt_at, _MESSAGE.c.created_at)
        .limit(batch)
        .with_for_update(skip_locked=True, of=_MESSAGE)
    )


@dataclass(frozen=True)
class Claimed:
    """A leased message and what sending it needs."""

    message: Hl7Message
    endpoint: Hl7Endpoint
    case: Case


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def mllp_url(host: str, port: int, tls: bool) -> str:
    """The endpoint as the URL the webhook sender's address rules take (https for TLS, http for plain)."""
    name = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{name}:{port}/"


def check_endpoint(
    host: str, port: int, tls: bool, env: str, resolve: Callable[[str], list[str]] | None = None
) -> list[str]:
    """The addresses the endpoint may be sent to (the webhook sender's rules); EndpointRefused says why not."""
    if not _HOST.fullmatch(host) and not _is_address(host):
        raise EndpointRefused(
            "host must be a DNS name or an IP address, without a scheme, port or path "
            "(e.g. mllp.hospital.example); the port goes in `port`"
        )
    if not tls and env != "dev":
        raise EndpointRefused(
            "plain MLLP (tls false) is allowed only in development; terminate TLS in front of your interface "
            "engine and register it with tls true"
        )
    return check_url(mllp_url(host, port, tls), env, resolve)


class Hl7Sender:
    """Sends due ORU^R01 messages. `run_once` is one pass (tests call it); `run_forever` is the thread body."""

    def __init__(
        self,
        *,
        engine: Engine,
        env: str,
        report_key: str | None,
        base_delay: float = 5.0,
        max_delay: float = 86400.0,
        timeout: float = 30.0,  # an interface engine files the result before it answers AA
        dns_timeout: float = DNS_TIMEOUT,
        rng: random.Random | None = None,
        tls: ssl.SSLContext | None = None,  # the CAs engines' certificates are checked against (tests')
    ) -> None:
        self.engine = engine
        self.env = env
        self.report_key = report_key
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.dns_timeout = min(dns_timeout, timeout)
        self.rng = rng or random.Random()
        self.tls = tls or httpx.create_ssl_context()
        self._stop = threading.Event()
        self._wake = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """New messages were committed: send them now, not at the next pass."""
        self._wake.set()

    def run_forever(self, interval: float = 1.0) -> None:
        """Each claimed message on a lane of its own: an ended lane wakes this loop, which claims for the free
        lanes again, so one engine's timeout delays no other engine's message."""
        running: set[Future[None]] = set()
        with ThreadPoolExecutor(LANES, thread_name_prefix="hl7-lane") as lanes:
            while not self._stop.is_set():
                self._wake.clear()
                running = {lane for lane in running if not lane.done()}
                try:
                    for item in self._claim(LANES - len(running)) if len(running) < LANES else []:
                        lane = lanes.submit(self._send_and_record, item)
                        lane.add_done_callback(lambda _: self._wake.set())
                        running.add(lane)
                except Exception as exc:
                    log.warning("hl7.dispatch_failed", error=type(exc).__name__)
                self._wake.wait(interval)

    def run_once(self, batch: int = BATCH) -> int:
        """Claim up to `batch` due messages (one per endpoint at most) and send them at the same time, each
        recorded as it ends; returns once all have. A crash before a record re-sends that message after the
        lease, with the same MSH-10."""
        claimed = self._claim(batch)
        if claimed:
            with ThreadPoolExecutor(len(claimed), thread_name_prefix="hl7-once") as lanes:
                for lane in [lanes.submit(self._send_and_record, item) for item in claimed]:
                    lane.result()
        return len(claimed)

    def _send_and_record(self, claimed: Claimed) -> None:
        try:
            self._record(self._send(claimed))
        except Exception as exc:  # not recorded: sent again after the lease, with the same MSH-10
            log.warning("hl7.record_failed", message_id=claimed.message.id, error=type(exc).__name__)

    def _claim(self, batch: int) -> list[Claimed]:
        now = datetime.now(UTC)
        with Session(self.engine, expire_on_commit=False) as session:
            ids = list(session.execute(_due_query(now, batch)).scalars())
            if not ids:
                return []
            session.execute(
                update(_MESSAGE).where(_MESSAGE.c.id.in_(ids)).values(next_attempt_at=now + LEASE)
            )
            messages = {m.id: m for m in session.exec(select(Hl7Message).where(col(Hl7Message.id).in_(ids)))}
            endpoints = {
                e.id: e
                for e in session.exec(
                    select(Hl7Endpoint).where(
                        col(Hl7Endpoint.id).in_({m.endpoint_id for m in messages.values()})
                    )
                )
            }
            cases = {
                c.id: c
                for c in session.exec(
                    select(Case).where(col(Case.id).in_({m.case_id for m in messages.values()}))
                )
            }
            session.commit()
        return [
            Claimed(messages[i], endpoints[messages[i].endpoint_id], cases[messages[i].case_id])
            for i in ids
            if messages[i].case_id in cases
        ]

    def _send(self, claimed: Claimed) -> Attempt:
        message, endpoint = claimed.message, claimed.endpoint
        started = time.monotonic()
        ack_code: str | None = None
        error = ""
        try:
            address = check_endpoint(
                endpoint.host,
                endpoint.port,
                endpoint.tls,
                self.env,
                lambda host: resolve_host(host, self.dns_timeout),
            )[0]
            payload = self._payload(claimed)
            ack_code, error = asyncio.run(self._exchange(endpoint, address, payload, message.id))
        except (EndpointRefused, ReportUnavailable) as exc:
            error = str(exc)
        except Exception as exc:  # a defect of ours costs this message an attempt, not the pass
            log.warning("hl7.send_failed", message_id=message.id, error=type(exc).__name__)
            error = f"{type(exc).__name__}: the sender failed on this message; it is retried"
        duration_ms = int((time.monotonic() - started) * 1000)
        return Attempt(
            message.id, message.case_id, endpoint.id, ack_code, error, duration_ms, datetime.now(UTC)
        )

    def _payload(self, claimed: Claimed) -> bytes:
        """The message as built at its first attempt: kept before it is first sent, and sent as it is on every
        retry and replay (an HL7 retry is the same message). A report version issued after the first attempt
        comes as its own C message, never into this one. Of two senders that built it at once, the first kept
        is the one sent."""
        if claimed.message.payload is not None:
            return claimed.message.payload.encode("utf-8")
        built = hl7_oru.oru_r01(self._report(claimed)).decode("utf-8")
        with Session(self.engine) as session:
            session.execute(
                update(_MESSAGE)
                .where(_MESSAGE.c.id == claimed.message.id, _MESSAGE.c.payload.is_(None))
                .values(payload=built)
            )
            kept = session.execute(
                core_select(_MESSAGE.c.payload).where(_MESSAGE.c.id == claimed.message.id)
            ).scalar_one()
            session.commit()
        return (kept or built).encode("utf-8")

    def _report(self, claimed: Claimed) -> hl7_oru.OruReport:
        """What the message says: the case as intake holds it, the report as the review service serves it."""
        message, endpoint, case = claimed.message, claimed.endpoint, claimed.case
        resource, pdf = self._read_report(message.fhir_url, message.pdf_url)
        request = CaseCreate.model_validate_json(case.request_json)
        return hl7_oru.OruReport(
            control_id=message.id,
            created_at=message.created_at,
            receiving_application=endpoint.receiving_application,
            receiving_facility=endpoint.receiving_facility,
            assigning_authority=endpoint.assigning_authority or endpoint.receiving_facility,
            patient=request.patient,
            placer_order=case.partner_case_ref,
            case_id=case.id,
            exam_type=request.exam.exam_type,
            performed_on=_date(resource.get("effectiveDateTime")) or request.exam.performed_on,
            issued=_moment(resource.get("issued")) or message.created_at,
            result_status=message.result_status,
            interpreter=_interpreter(resource),
            conclusion=resource.get("conclusion") or None,
            pdf=pdf,
            processing_id="P" if self.env == "prod" else "T",
        )

    def _read_report(self, fhir_url: str, pdf_url: str) -> tuple[dict[str, Any], bytes]:
        """The DiagnosticReport and the signed PDF, read with intake's key (INTAKE_REPORT_KEY)."""
        if not self.report_key:
            raise ReportUnavailable(
                "the report could not be read: INTAKE_REPORT_KEY (an operations API key intake reads reports "
                "with) is not set; the message is retried"
            )
        headers = {"Authorization": f"Bearer {self.report_key}"}
        try:
            with httpx.Client(timeout=self.timeout, headers=headers) as client:
                fhir = client.get(fhir_url, headers={"Accept": "application/fhir+json"})
                pdf = client.get(pdf_url, headers={"Accept": "application/pdf"})
        except httpx.HTTPError as exc:
            raise ReportUnavailable(
                f"the review service did not answer for the report ({type(exc).__name__}); the message is retried"
            ) from exc
        for answer, what in ((fhir, "DiagnosticReport"), (pdf, "PDF")):
            if answer.status_code != 200:
                raise ReportUnavailable(
                    f"the review service answered {answer.status_code} for the report's {what}; the message "
                    "is retried"
                )
        if not pdf.content.startswith(b"%PDF"):
            raise ReportUnavailable(
                "the review service's answer for the report PDF is not a PDF; it is retried"
            )
        try:
            resource = fhir.json()
        except ValueError as exc:
            raise ReportUnavailable(
                "the review service's DiagnosticReport is not JSON; it is retried"
            ) from exc
        return (resource if isinstance(resource, dict) else {}), pdf.content

    async def _exchange(
        self, endpoint: Hl7Endpoint, address: str, payload: bytes, message_id: str
    ) -> tuple[str | None, str]:
        """Send `payload` in one MLLP block and wait for the ACK to `message_id`: (MSA-1, what failed)."""
        others: list[str] = []  # answers that acknowledged another control id
        tls = self.tls if endpoint.tls else None
        try:
            return await asyncio.wait_for(
                self._ack(endpoint, address, payload, message_id, tls, others), self.timeout
            )
        except TimeoutError:
            ignored = "; an ACK for another control id was ignored" if others else ""
            return None, f"no ACK for this message within {self.timeout:g} s{ignored}"
        except ssl.SSLCertVerificationError as exc:
            return None, (
                f"the engine's TLS certificate was refused ({exc.verify_message}); serve a certificate for "
                f"{endpoint.host} from a public CA, with its intermediates"
            )
        except ssl.SSLError:
            return (
                None,
                "the TLS handshake with the engine failed; serve MLLP over TLS 1.2 or later on this port",
            )
        except asyncio.IncompleteReadError:
            return None, "the engine closed the connection without an ACK"
        except (InvalidBlockError, ValueError):
            return None, "the engine's answer was not an MLLP-framed ACK"
        except ConnectionRefusedError:
            return None, "could not connect to the engine (connection refused)"
        except OSError:
            return None, "could not connect to the engine (host unreachable or connection reset)"

    @staticmethod
    async def _ack(
        endpoint: Hl7Endpoint,
        address: str,
        payload: bytes,
        message_id: str,
        tls: ssl.SSLContext | None,
        others: list[str],
    ) -> tuple[str | None, str]:
        reader, writer = await open_hl7_connection(
            address,
            endpoint.port,
            limit=ACK_LIMIT,
            ssl=tls,
            server_hostname=endpoint.host if tls else None,
        )
        try:
            writer.writeblock(payload)
            await writer.drain()
            while True:
                ack = hl7_oru.read_ack(await reader.readblock())
                if ack is None:
                    continue  # not an ACK: wait for ours
                if ack.control_id != message_id:
                    others.append(ack.control_id)  # another message's ACK, not ours: wait for ours
                    continue
                if ack.code in hl7_oru.DELIVERED:
                    return ack.code, ""
                if ack.code in hl7_oru.REJECTED:
                    return (
                        ack.code,
                        f"the engine rejected the message ({ack.code}); it is retried, check its log",
                    )
                return ack.code, f"the engine answered {ack.code or 'an ACK without a code'}; it is retried"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    def _record(self, attempt: Attempt) -> None:
        """The attempt and the message's next state, in one transaction."""
        with Session(self.engine) as session:
            message = session.exec(
                select(Hl7Message).where(Hl7Message.id == attempt.message_id).with_for_update()
            ).first()
            if message is None or message.status != "pending":
                return
            message.attempts += 1
            message.last_ack_code = attempt.ack_code
            message.last_error = attempt.error[:300]
            if attempt.ack_code in hl7_oru.DELIVERED:
                outcome = message.status = "delivered"
                message.delivered_at = attempt.at
            elif message.attempts >= MAX_ATTEMPTS:
                outcome = message.status = "failed"
            else:
                outcome = "retry"
                wait = backoff(message.attempts, self.base_delay, self.max_delay, self.rng)
                message.next_attempt_at = attempt.at + timedelta(seconds=wait)
            session.add(message)
            _on_the_timeline(session, message, attempt, outcome)
            session.execute(
                insert(Hl7Attempt.__table__),  # type: ignore[attr-defined]
                {
                    "message_id": attempt.message_id,
                    "at": attempt.at,
                    "ack_code": attempt.ack_code,
                    "error": attempt.error[:300],
                    "duration_ms": attempt.duration_ms,
                },
            )
            session.commit()
        rejected = attempt.ack_code in hl7_oru.REJECTED
        ATTEMPTS.labels(outcome="rejected" if rejected else outcome).inc()
        fields = {
            "message_id": attempt.message_id,
            "case_id": attempt.case_id,
            "endpoint_id": attempt.endpoint_id,
            "ack_code": attempt.ack_code,
            "outcome": outcome,
        }
        if rejected:
            # The operations alert: the engine refuses what we send (a mapping or a profile it does not take).
            log.warning("hl7.message_rejected", **fields)
        elif outcome == "failed":
            log.warning("hl7.message_failed", **fields)
        else:
            log.info("hl7.attempt", **fields)


# A delivered message's kept bytes (the patient's identity and the report) are forgotten this long after delivery:
# a replay within it resends them as they were; a later one builds the message again from the report as it is.
KEEP_SENT_FOR = timedelta(days=30)


def forget_sent(engine: Engine, now: datetime | None = None) -> int:
    """Drop the kept bytes of messages delivered more than KEEP_SENT_FOR ago (intake's hourly purge); returns how
    many. A message not yet delivered keeps them: its retries must send the same message."""
    cutoff = (now or datetime.now(UTC)) - KEEP_SENT_FOR
    with Session(engine) as session:
        forgotten = session.execute(
            update(_MESSAGE)
            .where(
                _MESSAGE.c.status == "delivered",
                _MESSAGE.c.delivered_at < cutoff,
                _MESSAGE.c.payload.is_not(None),
            )
            .values(payload=None)
        )
        session.commit()
        return int(getattr(forgotten, "rowcount", 0) or 0)


def _on_the_timeline(session: Session, message: Hl7Message, attempt: Attempt, outcome: str) -> None:
    """What operations see on the case's timeline: the report filed by the hospital's engine (a `delivery`), or
    an `alert` when the engine rejected it (the first AR or CR) or every attempt failed. Codes, names and ids
    only, never the report's text."""
    endpoint = session.get(Hl7Endpoint, message.endpoint_id)
    engine = f"{endpoint.receiving_application}@{endpoint.receiving_facility}" if endpoint else "the engine"
    version = "the report" if message.result_status == "F" else "a new version of the report"
    if outcome == "delivered":
        key, kind = "delivered", "delivery"
        detail = (
            f"{version} filed by the hospital's HL7 interface engine {engine} "
            f"(ACK {attempt.ack_code}, ORU^R01 {message.id})"
        )
    elif outcome == "failed":
        key, kind = "failed", "alert"
        detail = (
            f"hl7_delivery_failed: {version} did not reach the HL7 interface engine {engine} after "
            f"{message.attempts} attempts (ORU^R01 {message.id}, last: {attempt.error[:120]}); the partner "
            "can replay it once its engine takes it"
        )
    elif attempt.ack_code in hl7_oru.REJECTED:
        key, kind = "rejected", "alert"
        detail = (
            f"hl7_rejected: the HL7 interface engine {engine} rejected {version} ({attempt.ack_code}, ORU^R01 "
            f"{message.id}); it is retried: the partner checks its engine's log"
        )
    else:
        return
    case = session.get(Case, message.case_id)
    if case is not None:
        # One entry each (event_id is unique): a replay's delivery, a second rejection add none.
        entry = CaseTimelineEntry(
            case_id=case.id, event_id=f"hl7:{message.id}:{key}", status=case.status, detail=detail,
            at=attempt.at, kind=kind,
        )  # fmt: skip
        insert_new(session, [entry])


def _interpreter(resource: dict[str, Any]) -> hl7_oru.Interpreter | None:
    for who in resource.get("resultsInterpreter") or []:
        if isinstance(who, dict) and who.get("display"):
            identifier = who.get("identifier") or {}
            npi = identifier.get("value") if isinstance(identifier, dict) else None
            return hl7_oru.Interpreter(name=str(who["display"]), npi=str(npi) if npi else None)
    return None


def _moment(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _date(value: Any) -> date | None:
    try:
        return date.fromisoformat(value[:10]) if isinstance(value, str) else None
    except ValueError:
        return None
