"""Outbound webhooks: partner endpoints, fan-out of case events, and the signed, retried delivery.

- An endpoint URL must be HTTPS and resolve to a public address; in development (ENV=dev) plain HTTP
  and loopback are allowed. The address is checked again at every send (DNS may change), and the send
  connects to the address checked, not to what the name resolves to a moment later.
- A delivery's `webhook-id` is derived from the endpoint and the source event, so it is the same on
  every attempt and on a manual replay; receivers dedupe on it.
- Retries follow Standard Webhooks' example schedule (RETRY_SCHEDULE: 5 s to 24 h, about three days in
  all, each wait shortened by up to a fifth at random); a longer `Retry-After` sets the next attempt; HTTP
  410 disables the endpoint; after MAX_ATTEMPTS the delivery is `failed` (replayable by hand).
- An attempt, the DNS lookup of the endpoint's host (DNS_TIMEOUT, 5 s) included, gets the status line and
  headers within `timeout` (20 s) in all, however slowly they arrive; the answer's body is read (up to
  64 KiB, within the same deadline) only to keep the connection, and dropped (nothing of it is stored or
  logged). Connections are kept alive for the same address and TLS server name only (endpoint_connections).
- Each endpoint has a lane of its own (up to LANES at once), its deliveries sent in order, one at a time; an
  endpoint that gives no answer gets nothing more that lane (its later deliveries wait for its retry,
  uncounted), and a slow one no more than ends within the lease (the rest is left for its next lane). A
  lane's end is no other lane's business: new deliveries to the other endpoints go out while it runs.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import queue
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import bindparam, exists, func, insert, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, select

from contracts.envelope import CloudEvent
from services.auth.models import Partner
from services.common.db import insert_new, insert_skipping_taken
from services.intake.endpoint_connections import (
    ConnectionKey,
    Deadline,
    EndpointConnections,
    may_keep,
    read_whole,
)
from services.intake.host_lookup import DNS_TIMEOUT, EndpointRefused, resolve_host
from services.intake.models import Case, CaseTimelineEntry, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from services.intake.webhook_signing import headers_for

log = structlog.get_logger(__name__)

PARTNER_EVENTS = ("case.status_changed", "records.needed", "report.ready", "report.amended")
# Standard Webhooks' example schedule: about three days from the first attempt to the last.
RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)  # seconds after attempt n (1-based)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
LEASE = timedelta(seconds=60)
LEASE_USED = 0.75  # a lane starts a send only if it ends, at worst, within this part of the lease
MAX_RETRY_AFTER = timedelta(hours=6)
BATCH = 20  # deliveries claimed per pass
LANES = 8  # endpoints a pass sends to at the same time
RECORD_EVERY = 2.0  # seconds: how long a batch's sent deliveries may wait to be recorded
ENDPOINTS_READ = "webhooks.endpoints_read"  # session.info: (transaction, partner id -> endpoints)
SECRETS_TTL = 5.0  # seconds a partner's signing secrets are reused between reads
WEBHOOK = "webhook"  # WebhookEndpoint.kind: Standard Webhooks JSON, each delivery on its own
SUBSCRIPTION = "fhir-subscription"  # a FHIR Subscription's channel: notification Bundles, in order


REDIRECTED = (
    "the endpoint answered with a redirect, which is not followed (it could lead anywhere); "
    "register the URL it redirects to"
)


class AnswerTooSlow(Exception):
    """The endpoint's status line and headers did not arrive within the attempt's timeout."""


def check_url(url: str, env: str, resolve: Callable[[str], list[str]] | None = None) -> list[str]:
    """The addresses `url`'s host resolves to, all of them allowed; EndpointRefused says what is not."""
    try:
        parts = urlsplit(url)
        httpx.URL(url)  # what the sender will parse: refused here, not at every send
    except (ValueError, httpx.InvalidURL) as exc:
        raise EndpointRefused(
            f"the endpoint URL is not a valid URL ({exc}); send https://host[:port]/path"
        ) from exc
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise EndpointRefused("the endpoint URL's port must be a number from 1 to 65535, or left out")
    dev = env == "dev"
    if parts.scheme not in ({"https", "http"} if dev else {"https"}):
        raise EndpointRefused("the endpoint URL must use https")
    if not parts.hostname or parts.username or parts.password:
        raise EndpointRefused("the endpoint URL needs a host and no user:password part")
    addresses = (resolve or resolve_host)(parts.hostname)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if ip.is_loopback and dev:
            continue
        if any(not a.is_global or a.is_multicast for a in (ip, *embedded_ipv4(ip))):
            raise EndpointRefused(
                "the endpoint resolves to a private, loopback or link-local address; use a public address"
            )
    return addresses


# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway may forward to: NAT64's well-known
# prefix (RFC 6052) and the deprecated IPv4-compatible addresses.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo's client), which is what a
    translating network connects to: 64:ff9b::a9fe:a9fe is 169.254.169.254 though Python calls it global."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    carried = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    return [a for a in carried if a is not None]


def what_failed(exc: httpx.HTTPError, timeout: float) -> str:
    """What the delivery log says of an attempt that got no HTTP answer: what the partner can check."""
    cause: BaseException | None = exc
    while cause is not None:  # httpx's error, raised from httpcore's, raised from the ssl module's
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"the endpoint's TLS certificate was refused ({cause.verify_message}); "
                "serve a certificate for the URL's host from a public CA, with its intermediates"
            )
        if isinstance(cause, ssl.SSLError):
            return "the TLS handshake with the endpoint failed; serve HTTPS (TLS 1.2 or later) on this port"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect to the endpoint within {timeout:g} s"
    if isinstance(exc, httpx.TimeoutException):
        return f"the endpoint did not answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect to the endpoint (connection refused or host unreachable)"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "the endpoint closed the connection before a complete HTTP answer"
    return f"{type(exc).__name__}: the endpoint did not answer"


def webhook_id(endpoint_id: str, source_event_id: str) -> str:
    return "msg_" + hashlib.sha256(f"{endpoint_id}|{source_event_id}".encode()).hexdigest()[:32]


def enabled_endpoints(session: Session, partner_id: str) -> list[WebhookEndpoint]:
    """The partner's enabled endpoints, read once per transaction (a consumer batch fans out many events
    of the same partners)."""
    transaction = session.get_transaction()
    read = session.info.get(ENDPOINTS_READ)
    if read is None or read[0] is not transaction:
        read = session.info[ENDPOINTS_READ] = (transaction, {})
    known: dict[str, list[WebhookEndpoint]] = read[1]
    if partner_id not in known:
        known[partner_id] = list(
            session.exec(
                select(WebhookEndpoint).where(
                    WebhookEndpoint.partner_id == partner_id,
                    col(WebhookEndpoint.disabled_at).is_(None),
                    WebhookEndpoint.kind == WEBHOOK,
                )
            ).all()
        )
    return known[partner_id]


def fan_out(session: Session, event: CloudEvent) -> int:
    """Queue `event` for every enabled endpoint of the case's partner (in the consumer's transaction)."""
    case = session.get(Case, event.subject)
    if case is None:
        return 0
    endpoints = enabled_endpoints(session, case.partner_id)
    payload = json.dumps({"type": event.type, "timestamp": event.time.isoformat(), "data": event.data})
    # A delivery already queued for an endpoint (a re-applied event) is skipped by the insert itself.
    insert_new(
        session,
        [
            WebhookDelivery(
                id=webhook_id(endpoint.id, event.id),
                endpoint_id=endpoint.id,
                source_event_id=event.id,
                event_type=event.type,
                case_id=case.id,
                payload=payload,
            )
            for endpoint in endpoints
        ],
    )
    return len(endpoints)


def withdraw(session: Session, case_id: str) -> None:
    """A cancelled case: records reminders not yet delivered are moot; status changes still go out."""
    pending = session.exec(
        select(WebhookDelivery).where(
            WebhookDelivery.case_id == case_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.event_type == "records.needed",
        )
    ).all()
    for delivery in pending:
        delivery.status = "cancelled"
        session.add(delivery)


def backoff(attempts: int, base: float, cap: float, rng: random.Random) -> float:
    """The scheduled wait after `attempts` failures, with up to 20% jitter (`base`/`cap` scale it in tests)."""
    step = RETRY_SCHEDULE[min(attempts, len(RETRY_SCHEDULE)) - 1] * base / 5.0
    return min(cap, step) * rng.uniform(0.8, 1.0)


def retry_after(value: str | None, now: datetime) -> timedelta | None:
    """The wait a partner's `Retry-After` asks for, at most MAX_RETRY_AFTER; None when it says nothing usable.
    Only ASCII digits are seconds (str.isdigit() also passes "²", which int() refuses), and a number longer
    than any wait we keep is the cap: neither may fail the record of the batch the answer came in."""
    if not value:
        return None
    seconds = value.strip()
    if re.fullmatch(r"[0-9]+", seconds):
        if len(seconds) > 9:
            return MAX_RETRY_AFTER
        return min(timedelta(seconds=int(seconds)), MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return min(max(moment - now, timedelta(0)), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Claimed:
    """A leased delivery: what sending it needs."""

    id: str
    case_id: str
    source_event_id: str
    payload: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class Target:
    """The endpoint a claimed delivery goes to. A FHIR Subscription's channel (`ordered`) is sent FHIR JSON with
    its own headers (`channel_headers`, JSON [[name, value], ...]) besides the signature, one delivery at a
    time in the order they were queued: an attempt that fails holds the later ones back to its retry."""

    id: str
    partner_id: str
    url: str
    ordered: bool = False
    channel_headers: str = "[]"


@dataclass(frozen=True)
class Attempt:
    """One send and what came of it, until it is recorded."""

    delivery: Claimed
    endpoint: Target
    status_code: int | None
    error: str
    retry_hint: str | None
    duration_ms: int
    at: datetime
    held_back: tuple[str, ...] = ()  # the endpoint's later deliveries of the pass, not sent after no answer
    released: tuple[str, ...] = ()  # the endpoint's later deliveries of the pass, left for the next pass


# The sender's statements, built once: plain SQL statements (no ORM objects, no unit of work), so a pass
# costs its round trips and little else. Every delivery of a case costs a claim, a send and a record.
_DELIVERY = WebhookDelivery.__table__  # type: ignore[attr-defined]
_ENDPOINT = WebhookEndpoint.__table__  # type: ignore[attr-defined]
_CASE = Case.__table__  # type: ignore[attr-defined]
_TIMELINE = CaseTimelineEntry.__table__  # type: ignore[attr-defined]
_EARLIER = _DELIVERY.alias("earlier")
# What is due, oldest first, leased with FOR UPDATE SKIP LOCKED so that another replica skips it.
_DUE = (
    core_select(
        _DELIVERY.c.id,
        _DELIVERY.c.case_id,
        _DELIVERY.c.source_event_id,
        _DELIVERY.c.payload,
        _DELIVERY.c.next_attempt_at.label("due"),
        _ENDPOINT.c.id.label("endpoint_id"),
        _ENDPOINT.c.partner_id,
        _ENDPOINT.c.url,
        _DELIVERY.c.created_at,
        _ENDPOINT.c.kind,
        _ENDPOINT.c.channel_headers,
    )
    .join(_ENDPOINT, _ENDPOINT.c.id == _DELIVERY.c.endpoint_id)
    .where(
        _DELIVERY.c.status == "pending",
        _DELIVERY.c.next_attempt_at <= bindparam("now"),
        _ENDPOINT.c.disabled_at.is_(None),
        _ENDPOINT.c.id.not_in(bindparam("busy", expanding=True)),  # endpoints this sender is sending to
        # A subscription's delivery waits while an earlier one of its channel is pending and not due (in its
        # backoff, or leased to a sender): a subscription's notifications arrive in order.
        or_(
            _ENDPOINT.c.kind != SUBSCRIPTION,
            ~exists().where(
                _EARLIER.c.endpoint_id == _DELIVERY.c.endpoint_id,
                _EARLIER.c.status == "pending",
                _EARLIER.c.created_at < _DELIVERY.c.created_at,
                _EARLIER.c.next_attempt_at > bindparam("now"),
            ),
        ),
    )
    .order_by(_DELIVERY.c.next_attempt_at, _DELIVERY.c.created_at)
    .limit(bindparam("batch"))
    .with_for_update(skip_locked=True, of=_DELIVERY)
)
# PostgreSQL leases in the statement that finds them (UPDATE ... FROM ... RETURNING the found rows);
# SQLite, whose RETURNING sees only the updated table, finds them first, then leases them.
_due = _DUE.subquery("due")
_CLAIM = (
    update(_DELIVERY)
    .where(_DELIVERY.c.id == _due.c.id)
    .values(next_attempt_at=bindparam("until"))
    .returning(*_due.c)
)
_LEASE = (
    update(_DELIVERY)
    .where(_DELIVERY.c.id.in_(bindparam("ids", expanding=True)))
    .values(next_attempt_at=bindparam("until"))
)
_CURRENT = (
    core_select(
        _DELIVERY.c.id,
        _DELIVERY.c.attempts,
        _DELIVERY.c.status,
        _DELIVERY.c.next_attempt_at,
        _DELIVERY.c.delivered_at,
        _DELIVERY.c.event_type,
    )
    .where(_DELIVERY.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_DELIVERY.c.id)  # locked in one order, as any other writer of several rows does
    .with_for_update()
)
_OUTCOME = (
    update(_DELIVERY)
    .where(_DELIVERY.c.id == bindparam("d_id"))
    .values(
        attempts=bindparam("d_attempts"),
        status=bindparam("d_status"),
        last_status_code=bindparam("d_status_code"),
        last_error=bindparam("d_error"),
        next_attempt_at=bindparam("d_next"),
        delivered_at=bindparam("d_delivered_at"),
    )
)
# Held back behind an attempt that got no answer: they wait for its retry, no attempt counted.
_HOLD = (
    update(_DELIVERY)
    .where(_DELIVERY.c.id == bindparam("h_id"), _DELIVERY.c.status == "pending")
    .values(next_attempt_at=bindparam("h_until"))
)
_ATTEMPT = insert(WebhookAttempt.__table__)  # type: ignore[attr-defined]
_GONE = (
    update(_ENDPOINT)
    .where(_ENDPOINT.c.id == bindparam("endpoint_id"), _ENDPOINT.c.disabled_at.is_(None))
    .values(disabled_at=bindparam("at"), disabled_reason="the endpoint answered 410 Gone")
)


# The partner's webhooks that carry the report: their delivery is on the case's timeline, as an HL7 engine's is.
REPORT_NOTICES = {"report.ready": "the report is ready", "report.amended": "a new version of the report"}


def _on_the_timeline(conn: Connection, changed: list[tuple[Attempt, str, str]]) -> None:
    """What operations see on the case's timeline, in the transaction that records the outcome (each attempt that
    changed its delivery's status, with the new status and the delivery's event type): a `delivery` when the
    partner's system took a report's webhook, an `alert` when a webhook (or FHIR Subscription notification) ended
    failed. Event types, codes and ids only, never a payload's content."""
    entries: list[dict[str, object]] = []
    cases = {a.delivery.case_id for a, _, _ in changed}
    if not cases:
        return
    selected = conn.execute(core_select(_CASE.c.id, _CASE.c.status).where(_CASE.c.id.in_(cases)))
    statuses: dict[str, str] = {row.id: row.status for row in selected}
    for attempt, outcome, event_type in changed:
        delivery, endpoint = attempt.delivery, attempt.endpoint
        status = statuses.get(delivery.case_id)
        if status is None:  # a FHIR Subscription's handshake or heartbeat: no case
            continue
        channel = (
            f"FHIR Subscription {endpoint.id}" if endpoint.ordered else f"webhook endpoint {endpoint.id}"
        )
        if outcome == "delivered" and event_type in REPORT_NOTICES:
            kind = "delivery"
            detail = (
                f"the partner's system told {REPORT_NOTICES[event_type]} ({event_type} to its {channel}, "
                f"HTTP {attempt.status_code}, webhook-id {delivery.id})"
            )
        elif outcome == "failed":
            kind = "alert"
            why = (
                "it answered 410 Gone and was disabled"
                if attempt.status_code == 410
                else f"after {MAX_ATTEMPTS} attempts, last: {attempt.error[:120] or f'HTTP {attempt.status_code}'}"
            )
            detail = (
                f"webhook_delivery_failed: {event_type} did not reach the partner's {channel} "
                f"({why}; webhook-id {delivery.id}); the partner can replay it once the endpoint takes it"
            )
        else:
            continue
        entries.append(
            {
                "case_id": delivery.case_id,
                "event_id": f"webhook:{delivery.id}:{outcome}",
                "status": status,
                "detail": detail,
                "at": attempt.at,
                "kind": kind,
            }
        )
    if entries:  # one entry each (event_id is unique): a replayed delivery that fails again adds none
        conn.execute(insert_skipping_taken(conn.dialect.name, _TIMELINE), entries)


def by_endpoint(due: list[tuple[Claimed, Target]]) -> dict[str, list[tuple[Claimed, Target]]]:
    """Claimed deliveries as lanes: each endpoint's, in the order they were claimed (oldest first)."""
    lanes: dict[str, list[tuple[Claimed, Target]]] = {}
    for delivery, endpoint in due:
        lanes.setdefault(endpoint.id, []).append((delivery, endpoint))
    for lane in lanes.values():
        if lane[0][1].ordered:  # a subscription's: in the order queued (a retried one is due later)
            lane.sort(key=lambda pair: (pair[0].created_at or datetime.min.replace(tzinfo=UTC), pair[0].id))
    return lanes


class WebhookDispatcher:
    """Sends due deliveries. `run_once` is one pass (tests call it); `run_forever` is the thread body."""

    def __init__(
        self,
        *,
        engine: Engine,
        auth_engine: Engine,
        env: str,
        base_delay: float = 5.0,
        max_delay: float = 86400.0,
        timeout: float = 20.0,  # Standard Webhooks: 15-30 s
        dns_timeout: float = DNS_TIMEOUT,
        rng: random.Random | None = None,
        tls: ssl.SSLContext | None = None,  # the CAs endpoints' certificates are checked against (tests')
    ) -> None:
        self.engine = engine
        self.auth_engine = auth_engine
        self.env = env
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.rng = rng or random.Random()
        self.timeout = timeout
        self.dns_timeout = min(dns_timeout, timeout)
        self.connections = EndpointConnections(tls or httpx.create_ssl_context())
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._secrets_cache: dict[str, tuple[float, list[str]]] = {}
        # run_forever's lanes: the endpoints being sent to (until their attempts are recorded), and the
        # attempts of lanes that ended, for the sender's thread to record.
        self._busy: set[str] = set()
        self._ended: queue.SimpleQueue[tuple[str, list[Attempt]]] = queue.SimpleQueue()
        self._passed_over: set[str] = set()  # busy endpoints a claim left out: claim again when they end
        self._claim_wanted = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        """Close the connections kept alive (a stopped `run_forever` has closed them)."""
        self.connections.close()

    def wake(self) -> None:
        """New deliveries were committed: send them now, not at the next pass."""
        self._claim_wanted.set()
        self._wake.set()

    def run_forever(self, interval: float = 1.0) -> None:
        """Each endpoint's lane runs on its own: a slow endpoint holds its own lane, not the deliveries of
        the others, which are claimed and sent as soon as they are due (an ended lane wakes this loop, which
        records what it sent and claims again). An endpoint whose lane runs is not claimed for meanwhile, so
        its deliveries go one at a time and in order; the lease still keeps other replicas off them."""
        next_claim = 0.0
        with ThreadPoolExecutor(LANES, thread_name_prefix="webhooks-lane") as lanes:
            # Woken when the consumer commits deliveries or a lane ends; every `interval` retries when due.
            while not self._stop.is_set():
                self._wake.clear()  # before the claim: a wake during it makes the next one start at once
                try:
                    self._record_ended()
                    if self._claim_wanted.is_set() or time.monotonic() >= next_claim:
                        self._claim_wanted.clear()
                        next_claim = time.monotonic() + interval
                        # A full batch may have left more due: claim again (for endpoints without a lane).
                        # A shorter one took all that was due when it looked; a commit since woke us.
                        while self._start_lanes(lanes) >= BATCH and not self._stop.is_set():
                            self._record_ended()
                except Exception as exc:
                    log.warning("webhooks.dispatch_failed", error=type(exc).__name__)
                self.connections.close_idle()
                if not self._claim_wanted.is_set():  # a lane that ended meanwhile may want one at once
                    self._wake.wait(max(next_claim - time.monotonic(), 0.0))
        # The lanes have ended (each stops at its attempt under way and leaves its rest for the next start).
        try:
            self._record_ended()
        except Exception as exc:
            log.warning("webhooks.dispatch_failed", error=type(exc).__name__)
        self.connections.close()

    def _start_lanes(self, lanes: ThreadPoolExecutor) -> int:
        """Claim what is due for endpoints without a running lane, while a lane is free, and start a lane
        for each endpoint claimed; the number of deliveries claimed."""
        # What is due for the endpoints left out is claimed when their lanes end (no claim after every lane).
        self._passed_over |= self._busy
        if len(self._busy) >= LANES:
            return 0
        due = self._claim(BATCH, busy=self._busy)
        started = time.monotonic()
        for endpoint_id, lane in by_endpoint(due).items():
            self._busy.add(endpoint_id)
            lanes.submit(self._run_lane, endpoint_id, lane, started)
        return len(due)

    def _run_lane(self, endpoint_id: str, lane: list[tuple[Claimed, Target]], started: float) -> None:
        attempts: list[Attempt] = []
        try:
            attempts = self._send_lane(lane, started)
        except Exception as exc:  # what it sent unrecorded is sent again after the lease (same webhook-id)
            log.warning("webhooks.lane_failed", endpoint_id=endpoint_id, error=type(exc).__name__)
        finally:
            self._ended.put((endpoint_id, attempts))
            self._wake.set()

    def _record_ended(self) -> None:
        """Record the attempts of the lanes that ended since (one transaction), and free their endpoints."""
        ended: list[tuple[str, list[Attempt]]] = []
        while not self._ended.empty():
            ended.append(self._ended.get_nowait())
        try:
            self._record([attempt for _, attempts in ended for attempt in attempts])
        finally:
            freed = {endpoint_id for endpoint_id, _ in ended}
            self._busy -= freed
            if freed & self._passed_over:
                self._passed_over -= freed
                self._claim_wanted.set()

    def run_once(self, batch: int = BATCH) -> int:
        """One pass, ended when its last lane ends (tests; `run_forever` waits for no lane to claim again).
        Claim up to `batch` due deliveries and send them, a lane per endpoint: the lanes at the same time
        (up to LANES), each endpoint's deliveries in order. An endpoint that gives no answer costs one
        timeout a pass, so no other endpoint waits behind it and a pass ends well inside the lease.
        Outcomes are recorded together (one transaction); a lane still sending after RECORD_EVERY seconds
        records its own as it goes. A crash before the record re-sends those deliveries after the lease,
        with the same `webhook-id`, which receivers dedupe on."""
        due = self._claim(batch)
        lanes = by_endpoint(due)
        started = time.monotonic()
        if len(lanes) <= 1:
            sent = [self._send_lane(lane, started) for lane in lanes.values()]
        else:
            with ThreadPoolExecutor(min(len(lanes), LANES), thread_name_prefix="webhooks-lane") as pool:
                sent = list(pool.map(lambda lane: self._send_lane(lane, started), lanes.values()))
        self._record([attempt for attempts in sent for attempt in attempts])
        return len(due)

    def _send_lane(self, lane: list[tuple[Claimed, Target]], started: float) -> list[Attempt]:
        """Send one endpoint's deliveries in order; the attempts not recorded yet. After an attempt with no
        HTTP answer (a timeout, a refused connection or certificate) the endpoint's later deliveries are held
        back to that attempt's retry, unsent and uncounted: one dead endpoint costs one timeout a pass."""
        attempts: list[Attempt] = []
        recorded = started
        for n, (delivery, endpoint) in enumerate(lane):
            elapsed = time.monotonic() - started
            # A send starts only if it ends, at worst, within the lease: else another replica could claim
            # and send the rest beside this one (a slow endpoint's later deliveries, or a lane that waited
            # for a free one behind dead endpoints). The rest is due again at once, for the next pass. A
            # lane's first send before any could have timed out always starts (whatever the settings).
            # On stop, the rest is left too, so the sender ends at its attempts under way.
            late = elapsed + self.timeout > LEASE.total_seconds() * LEASE_USED and (
                n or elapsed >= self.timeout
            )
            if late or self._stop.is_set():
                rest = tuple(d.id for d, _ in lane[n:])
                if attempts:
                    attempts[-1] = replace(attempts[-1], released=rest)
                else:
                    self._release(rest)
                break
            attempt = self._send(delivery, endpoint)
            failed = attempt.status_code is None or (
                endpoint.ordered and not 200 <= attempt.status_code < 300
            )
            if failed and n + 1 < len(lane):
                attempts.append(replace(attempt, held_back=tuple(d.id for d, _ in lane[n + 1 :])))
                break
            attempts.append(attempt)
            if time.monotonic() - recorded >= RECORD_EVERY:
                self._record(attempts)
                attempts, recorded = [], time.monotonic()
        return attempts

    def _claim(self, batch: int, busy: Collection[str] = ()) -> list[tuple[Claimed, Target]]:
        """Lease due deliveries so another replica does not send them at the same time; none of the `busy`
        endpoints'."""
        now = datetime.now(UTC)
        params = {"now": now, "batch": batch, "until": now + LEASE, "busy": list(busy)}
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                rows = list(conn.execute(_CLAIM, params))
                rows.sort(key=lambda row: (row.due, row.id))  # RETURNING keeps no order
            else:
                rows = list(conn.execute(_DUE, params))
                if rows:
                    conn.execute(_LEASE, {"ids": [row.id for row in rows], "until": params["until"]})
        claimed = [
            (
                Claimed(row.id, row.case_id, row.source_event_id, row.payload, row.created_at),
                Target(
                    row.endpoint_id, row.partner_id, row.url, row.kind == SUBSCRIPTION, row.channel_headers
                ),
            )
            for row in rows
        ]
        return self._in_order(claimed)

    def _in_order(self, claimed: list[tuple[Claimed, Target]]) -> list[tuple[Claimed, Target]]:
        """Leave out (release) a subscription's deliveries claimed while an earlier one of its channel was due
        but not claimed (the batch ended before it): sent now, they would arrive before it."""
        ordered = {endpoint.id for _, endpoint in claimed if endpoint.ordered}
        if not ordered:
            return claimed
        ids = [delivery.id for delivery, _ in claimed]
        with self.engine.begin() as conn:
            earliest: dict[str, datetime] = dict(
                conn.execute(
                    core_select(_DELIVERY.c.endpoint_id, func.min(_DELIVERY.c.created_at))
                    .where(
                        _DELIVERY.c.endpoint_id.in_(ordered),
                        _DELIVERY.c.status == "pending",
                        _DELIVERY.c.id.not_in(ids),
                    )
                    .group_by(_DELIVERY.c.endpoint_id)
                ).all()
            )
        kept: list[tuple[Claimed, Target]] = []
        released: list[tuple[Claimed, Target]] = []
        for delivery, endpoint in claimed:
            first_left = earliest.get(endpoint.id)
            later = (
                first_left is not None
                and delivery.created_at is not None
                and delivery.created_at > first_left
            )
            (released if later else kept).append((delivery, endpoint))
        if released:
            self._release(tuple(delivery.id for delivery, _ in released))
        return kept

    def _secrets(self, partner_id: str) -> list[str]:
        """The partner's signing secrets, read again after SECRETS_TTL (a rotation reaches the sender
        within it; the previous secret stays valid for a day after one anyway)."""
        now = time.monotonic()
        cached = self._secrets_cache.get(partner_id)
        if cached is not None and now - cached[0] < SECRETS_TTL:
            return cached[1]
        with Session(self.auth_engine) as session:
            partner = session.get(Partner, partner_id)
        secrets = partner.webhook_secrets(datetime.now(UTC)) if partner else []
        self._secrets_cache[partner_id] = (now, secrets)
        return secrets

    def _send(self, delivery: Claimed, endpoint: Target) -> Attempt:
        body = delivery.payload.encode()
        started = time.monotonic()
        status_code: int | None = None
        error = ""
        retry_hint: str | None = None
        try:
            address = check_url(endpoint.url, self.env, lambda host: resolve_host(host, self.dns_timeout))[0]
            secrets = self._secrets(endpoint.partner_id)
            if not secrets:
                raise EndpointRefused("the partner no longer exists")
            headers = headers_for(secrets, delivery.id, int(time.time()), body)
            if endpoint.ordered:  # a FHIR Subscription's notification: its channel.header values, FHIR JSON
                for name, value in json.loads(endpoint.channel_headers):
                    headers[name.lower()] = value
                headers["content-type"] = "application/fhir+json"
            # The lookup's time counts: an attempt ends within `timeout` in all, as the lease rule assumes.
            response = self._post(
                endpoint.url,
                address,
                body,
                {"content-type": "application/json", **headers},
                within=started + self.timeout - time.monotonic(),
            )
            status_code = response.status_code
            retry_hint = response.headers.get("retry-after")
            if response.is_redirect:
                error = REDIRECTED
        except EndpointRefused as exc:
            error = str(exc)
        except AnswerTooSlow as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = what_failed(exc, self.timeout)
        except Exception as exc:  # a defect of ours costs this delivery an attempt, not the batch its record
            log.warning("webhooks.send_failed", delivery_id=delivery.id, error=type(exc).__name__)
            error = f"{type(exc).__name__}: the sender failed on this delivery; it is retried"
        duration_ms = int((time.monotonic() - started) * 1000)
        return Attempt(delivery, endpoint, status_code, error, retry_hint, duration_ms, datetime.now(UTC))

    def _post(
        self, url: str, address: str, body: bytes, headers: dict[str, str], within: float
    ) -> httpx.Response:
        """POST to `address`, the one `check_url` allowed (resolving the name again to connect would let a
        name server answer a public address to the check and a private one to the connection), with the
        URL's host as Host and as the TLS server name the certificate is checked against.

        The status line and headers must come within `within` seconds in all (what is left of the attempt's
        `timeout`). httpx's timeout bounds each read, so an endpoint answering a byte at a time could hold the
        sender as long as it liked: at the deadline the socket of the connection the attempt goes over is
        shut (a kept one's is known before it sends; a new one's when it connects, at once if that is after
        the deadline). The body is then read, within the same deadline, only to keep the connection: up to
        MAX_ANSWER_BODY, dropped as it comes (never stored); a longer one, or one cut off, closes it, and
        the answer stands. A connection is kept only for the same address and TLS server name; a kept one
        the endpoint closed as the request went out is replaced once by a new one, within the deadline."""
        within = max(within, 0.001)
        target = httpx.URL(url)
        pinned = target.copy_with(host=address)
        server_name = target.raw_host.decode("ascii")
        key = ConnectionKey(
            target.scheme, address, pinned.port or (443 if target.scheme == "https" else 80), server_name
        )
        connection = self.connections.take(key)
        deadline = Deadline(within)
        keep = False
        try:
            while True:
                reused = connection.sock is not None
                if connection.sock is not None:
                    deadline.watch(connection.sock)
                request = httpx.Request(
                    "POST",
                    pinned,
                    content=body,
                    headers={**headers, "host": target.netloc.decode("ascii")},
                    extensions={
                        "trace": deadline.trace,
                        "sni_hostname": server_name,
                        "timeout": httpx.Timeout(within).as_dict(),
                    },
                )
                try:
                    # A transport, not a client: no redirect followed, no proxy taken from the environment.
                    response = connection.transport.handle_request(request)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    if not reused or deadline.expired:
                        raise
                    # A kept connection the endpoint closed as the request went out (its idle time ran out):
                    # once more, on a new one (the webhook-id is the same, a receiver dedupes on it).
                    connection.close()
                    connection = self.connections.new()
                    continue
                response.request = request
                whole = False
                try:
                    whole = read_whole(response)
                except httpx.HTTPError:  # the deadline or a hang-up within the body: the answer stands
                    pass
                finally:
                    response.close()  # httpcore closes the connection unless read whole and may be kept
                keep = whole and may_keep(response)
                if keep:
                    connection.sock = response.extensions["network_stream"].get_extra_info("socket")
                return response
        except httpx.HTTPError as exc:
            if deadline.expired:
                raise AnswerTooSlow(f"the endpoint did not answer within {self.timeout:g} s") from exc
            raise
        finally:
            if deadline.end() or not keep:
                connection.close()
            else:
                self.connections.give_back(key, connection)

    def _record(self, attempts: list[Attempt]) -> None:
        """Write the attempts and each delivery's next state in one transaction."""
        if not attempts:
            return
        outcomes: list[tuple[Attempt, str]] = []
        with self.engine.begin() as conn:
            ids = [a.delivery.id for a in attempts]
            ids += [other for a in attempts for other in (*a.held_back, *a.released)]
            current = {row.id: row for row in conn.execute(_CURRENT, {"ids": ids})}
            changes: list[dict[str, object]] = []
            holds: list[dict[str, object]] = []
            for attempt in attempts:
                row = current.get(attempt.delivery.id)
                if row is not None:
                    change = self._outcome(row, attempt)
                    changes.append(change)
                    outcomes.append((attempt, str(change["d_status"])))
                    holds += [{"h_id": held, "h_until": change["d_next"]} for held in attempt.held_back]
                    holds += [{"h_id": rest, "h_until": attempt.at} for rest in attempt.released]
                    if attempt.status_code == 410:
                        self._disable(conn, attempt)
            if holds:
                conn.execute(_HOLD, holds)
            if changes:
                conn.execute(_OUTCOME, changes)
                conn.execute(
                    _ATTEMPT,
                    [
                        {
                            "delivery_id": a.delivery.id,
                            "at": a.at,
                            "status_code": a.status_code,
                            "error": a.error[:300],
                            "duration_ms": a.duration_ms,
                        }
                        for a, _ in outcomes
                    ],
                )
            _on_the_timeline(
                conn,
                [
                    (a, o, current[a.delivery.id].event_type)
                    for a, o in outcomes
                    if current[a.delivery.id].status != o
                ],
            )
        for attempt, outcome in outcomes:
            log.info(
                "webhooks.attempt",
                delivery_id=attempt.delivery.id,
                case_id=attempt.delivery.case_id,
                status_code=attempt.status_code,
                outcome=outcome,
            )

    def _release(self, ids: tuple[str, ...]) -> None:
        """Leased deliveries not sent in this pass: due again at once."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(_HOLD, [{"h_id": id_, "h_until": now} for id_ in ids])

    def _outcome(self, row: Any, attempt: Attempt) -> dict[str, object]:
        """The delivery's next state after `attempt` (as the parameters of `_OUTCOME`)."""
        now, status_code = attempt.at, attempt.status_code
        attempts = row.attempts + 1
        status, next_at, delivered_at = row.status, row.next_attempt_at, row.delivered_at
        if status_code is not None and 200 <= status_code < 300:
            status, delivered_at = "delivered", now
        elif status_code == 410 or attempts >= MAX_ATTEMPTS:
            status = "failed"
        else:
            # Retry-After is the least wait: a shorter one than the schedule's would spend the attempts meant
            # for three days within minutes (a maintenance page sends "Retry-After: 1").
            scheduled = timedelta(seconds=backoff(attempts, self.base_delay, self.max_delay, self.rng))
            next_at = now + max(retry_after(attempt.retry_hint, now) or scheduled, scheduled)
        return {
            "d_id": row.id,
            "d_attempts": attempts,
            "d_status": status,
            "d_status_code": status_code,
            "d_error": attempt.error[:300],
            "d_next": next_at,
            "d_delivered_at": delivered_at,
        }

    @staticmethod
    def _disable(conn: Connection, attempt: Attempt) -> None:
        """HTTP 410 Gone: the endpoint is disabled (once) and gets nothing more."""
        disabled = conn.execute(_GONE, {"endpoint_id": attempt.endpoint.id, "at": attempt.at}).rowcount
        if disabled:
            log.info(
                "webhooks.endpoint_disabled",
                endpoint_id=attempt.endpoint.id,
                partner_id=attempt.endpoint.partner_id,
            )
