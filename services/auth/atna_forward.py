"""The audit log forwarded to a hospital's audit record repository: IHE ATNA Record Audit Event (ITI-20).

Each entry of the chain, in order, becomes one DICOM audit message (services.auth.atna) in one RFC 5424 syslog
message (facility authpriv, severity notice, MSGID `IHE+RFC-3881`, the XML after a BOM), sent over TLS with the
RFC 5425 octet-counting framing (`LEN SP MSG`), with this platform's client certificate (mutual TLS); or, to a
repository that takes only UDP (`udp://`, RFC 5426), one message per datagram, unframed and unencrypted.

Delivery over TLS: at least once, in the chain's order. The feed's cursor (`audit_forward_cursors`: the id of the last
entry the repository took) is in the database and moves only once the TLS write of every entry up to it has
completed on a connection the repository has not closed (syslog has no acknowledgement: a connection found
closed before or after the write is opened again and everything after the cursor is sent again; a new
connection is watched for a moment before the first write, since under TLS 1.3 the repository refuses our
certificate only after our side of the handshake is done). While the
repository is down the forwarder retries with a growing pause (up to `AUDIT_ATNA_BACKOFF_MAX_SECONDS`) and the
entries wait in the log, which is the queue: nothing is held in memory that the log does not hold. One
forwarder sends at a time across replicas: each holds a PostgreSQL advisory lock on its own connection while
it forwards, the others stand by. Their logs name counts and the cursor, never an entry's content.

Delivery over UDP: at most once, in order. A datagram has no acknowledgement: the cursor moves past an entry once
its datagram was handed to the kernel without error. A refusal the kernel reports (the repository's ICMP port
unreachable, as ConnectionRefusedError on our connected socket; no route) stops the batch there and keeps the
cursor before the entry it was reported on, retried like TLS; a datagram lost on the way, or refused only after
later ones were sent, is lost. A message longer than `AUDIT_ATNA_UDP_MAX_OCTETS` has its free text cut (with an
ellipsis) until it fits; one too long even so is skipped, its entry id logged (`atna.entry_too_large`) and
counted (`secondopinion_audit_forward_skipped_total`).

  ForwardingStopped       (never raised to the caller: `run` retries)
    + RepositoryUnavailable   (connecting, the TLS handshake, a write or a datagram failed; retried with backoff)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
from prometheus_client import Counter, Gauge
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import bindparam, func, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col
from sqlmodel import select as sql_select

from services.auth import audit
from services.auth.atna import Source, to_dicom_audit
from services.auth.models import AuditEvent, CaseOwner, ForwardCursor
from services.common.db import utcnow

log = structlog.get_logger(__name__)

# One forwarder per feed at a time: a session-level PostgreSQL advisory lock (the two-key form, this key space
# and the feed's name hashed), held while forwarding.
FORWARDER_LOCKS = 0x5EC0_A0D3
# RFC 5424 PRI: facility 10 (security/authorization, authpriv) * 8 + severity 5 (notice), as IHE ITI-20 asks.
PRI = 10 * 8 + 5
MSGID = "IHE+RFC-3881"
# How long a new TLS connection is watched for a refusal before the first entry goes into it (once per connection).
ACCEPTANCE_SECONDS = 0.3
BOM = b"\xef\xbb\xbf"
# RFC 5426 3.2: every IPv4 receiver must take datagrams of 480 octets (and should take 2048); the largest UDP
# payload over IPv4 is 65,535 octets less the IP and UDP headers.
UDP_SMALLEST, UDP_LARGEST = 480, 65_507
# Free text is cut to these many characters, in turn, until a message fits its datagram.
FREE_TEXT_CUTS = (1024, 256, 64, 0)

SENT = Counter("secondopinion_audit_forwarded_total", "audit entries the ATNA repository took", ["feed"])
SKIPPED = Counter(
    "secondopinion_audit_forward_skipped_total",
    "audit entries too large for a UDP datagram, not sent",
    ["feed"],
)
BACKLOG = Gauge("secondopinion_audit_forward_backlog", "audit entries not yet forwarded", ["feed"])


class AtnaSettings(BaseSettings):
    """IHE ATNA feed settings (`AUDIT_ATNA_*`); the feed is off while `AUDIT_ATNA_URL` is empty."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_ATNA_", env_file=".env", extra="ignore")

    # tls://host:6514 (RFC 5425); udp://host:514 (RFC 5426); tcp://host:port only outside production
    url: str = ""
    ca_file: str = ""  # the repository's CA (PEM); empty: the system's
    cert_file: str = ""  # our client certificate (PEM) for mutual TLS
    key_file: str = ""
    app_name: str = "secondopinion"  # AuditSourceID and the syslog APP-NAME
    site_id: str = ""  # AuditEnterpriseSiteID: the hospital's name for where this system runs
    feed: str = "atna"  # the cursor's name: a second repository is a second feed
    start: str = "oldest"  # where a new feed starts: oldest (the whole log) or now (entries after its start)
    batch: int = 200
    poll_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    timeout_seconds: float = 10.0
    metrics_port: int = 0  # serve /metrics (the backlog gauge) on this port; 0: none
    # udp:// with ENV=prod: the hospital's repository takes only UDP, on a network trusted with the audit trail.
    allow_udp: bool = False
    # The largest datagram sent over udp://: a longer message's free text is cut, one too long even so skipped.
    udp_max_octets: int = 8192
    # Datagrams a second at most over udp:// (0: unpaced). A batch sent at once (up to `batch`, 200 of about
    # 2 KB) can overrun a repository's receive buffer (Linux's default holds about 200 KB), and each one dropped
    # there is lost: nothing tells us.
    udp_per_second: float = 500.0

    def problems(self, env: str) -> list[str]:
        """What keeps this feed from starting; in production (ENV=prod) only mutual TLS will do, or UDP where
        the operator says so (`AUDIT_ATNA_ALLOW_UDP`)."""
        parts = urlsplit(self.url)
        scheme = parts.scheme
        found = []
        if not self.url:
            found.append("AUDIT_ATNA_URL is not set (tls://host:port of the audit record repository)")
        elif scheme not in ("tls", "udp", "tcp") or not parts.hostname or not parts.port:
            found.append(
                "AUDIT_ATNA_URL must be tls://host:port or udp://host:port (or tcp://host:port outside production), "
                f"not {scheme}://…"
            )
        if env == "prod" and scheme not in ("tls", "udp"):
            found.append("AUDIT_ATNA_URL must use tls:// in production (RFC 5425)")
        if env == "prod" and scheme == "udp" and not self.allow_udp:
            found.append(
                "AUDIT_ATNA_URL udp:// sends the audit trail unencrypted and unacknowledged (RFC 5426): in "
                "production use tls:// (RFC 5425), or set AUDIT_ATNA_ALLOW_UDP=true if the hospital's repository "
                "takes only UDP on a network trusted with it"
            )
        if scheme == "udp" and not UDP_SMALLEST <= self.udp_max_octets <= UDP_LARGEST:
            found.append(
                f"AUDIT_ATNA_UDP_MAX_OCTETS must be from {UDP_SMALLEST} (what RFC 5426 has every IPv4 receiver "
                f"take) to {UDP_LARGEST} (the largest UDP datagram over IPv4), not {self.udp_max_octets}"
            )
        if scheme == "udp" and self.udp_per_second < 0:
            found.append(
                f"AUDIT_ATNA_UDP_PER_SECOND must be 0 (unpaced) or more datagrams a second, not {self.udp_per_second}"
            )
        if env == "prod" and scheme != "udp" and not (self.cert_file and self.key_file):
            found.append(
                "AUDIT_ATNA_CERT_FILE and AUDIT_ATNA_KEY_FILE are required in production (mutual TLS)"
            )
        if self.start not in ("oldest", "now"):
            found.append("AUDIT_ATNA_START must be oldest or now")
        return found


@lru_cache
def get_atna_settings() -> AtnaSettings:
    return AtnaSettings()


class ForwardingStopped(Exception):
    pass


class RepositoryUnavailable(ForwardingStopped):
    def __init__(self, reason: str, delivered: int = 0) -> None:
        super().__init__(reason)
        self.delivered = delivered  # messages of the batch handed over before it failed (UDP; TLS: none)


def syslog_message(
    entry: AuditEvent, source: Source, patient_id: str | None = None, free_text: int | None = None
) -> bytes:
    """One entry as an RFC 5424 message with the XML as MSG (`free_text`: see `to_dicom_audit`)."""
    at = entry.at.replace(tzinfo=UTC) if entry.at.tzinfo is None else entry.at.astimezone(UTC)
    stamp = at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{PRI}>1 {stamp} {source.host[:255]} {source.app_name[:48]} {entry.service[:128]} {MSGID} - "
    return header.encode("ascii", "replace") + BOM + to_dicom_audit(entry, source, patient_id, free_text)


def syslog_frame(entry: AuditEvent, source: Source, patient_id: str | None = None) -> bytes:
    """One entry as an RFC 5425 frame: `MSG-LEN SP SYSLOG-MSG`."""
    message = syslog_message(entry, source, patient_id)
    return f"{len(message)} ".encode() + message


class Transport(Protocol):
    def encode(self, entry: AuditEvent, source: Source, patient_id: str | None) -> bytes | None: ...

    def send(self, messages: list[bytes]) -> None: ...

    def close(self) -> None: ...


class _Socket:
    """A transport's one socket, opened when first needed and closed on failure or at the end."""

    _sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class SyslogUdp(_Socket):
    """Datagrams to the repository (RFC 5426): one RFC 5424 message each, no framing, no acknowledgement."""

    def __init__(self, settings: AtnaSettings) -> None:
        parts = urlsplit(settings.url)
        self.host, self.port = parts.hostname or "", parts.port or 514
        self.feed, self.max_octets = settings.feed, settings.udp_max_octets
        self.spacing = 1 / settings.udp_per_second if settings.udp_per_second > 0 else 0.0
        self._next_at = 0.0  # time.monotonic() at which the next datagram may go
        self._sock: socket.socket | None = None

    def encode(self, entry: AuditEvent, source: Source, patient_id: str | None) -> bytes | None:
        """The entry's message, its free text cut until it fits a datagram; None (logged) when it cannot."""
        message = full = syslog_message(entry, source, patient_id)
        cuts = iter(FREE_TEXT_CUTS)
        while len(message) > self.max_octets and (cut := next(cuts, None)) is not None:
            message = syslog_message(entry, source, patient_id, free_text=cut)
        if len(message) > self.max_octets:
            SKIPPED.labels(self.feed).inc()
            log.error(
                "atna.entry_too_large",
                feed=self.feed,
                entry_id=entry.id,
                octets=len(message),
                udp_max_octets=self.max_octets,
            )
            return None
        if message is not full:
            log.warning(
                "atna.entry_shortened", feed=self.feed, entry_id=entry.id, octets=len(full), sent=len(message)
            )
        return message

    def send(self, messages: list[bytes]) -> None:
        """Hand each message to the kernel as one datagram, in order; RepositoryUnavailable, with how many were
        handed over, at the first the kernel refuses or on which it reports the repository's refusal."""
        for delivered, message in enumerate(messages):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._paced()
                self._sock.send(message)
                # An ICMP port unreachable for this datagram (or one before) is reported on the socket; on a
                # connected socket the next send would raise it, a datagram later than the one refused.
                if refused := self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(refused, os.strerror(refused))
            except OSError as exc:
                self.close()
                raise RepositoryUnavailable(type(exc).__name__, delivered) from exc

    def _paced(self) -> None:
        """Wait until the next datagram may go (AUDIT_ATNA_UDP_PER_SECOND): an even stream, not a burst."""
        if not self.spacing:
            return
        now = time.monotonic()
        if now < self._next_at:
            time.sleep(self._next_at - now)
        self._next_at = max(now, self._next_at) + self.spacing

    def _connect(self) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.connect(address)  # a connected socket hears of the repository's refusals
        except BaseException:
            sock.close()
            raise
        return sock


class SyslogTls(_Socket):
    """One connection to the repository (TLS unless the URL says tcp://)."""

    def __init__(self, settings: AtnaSettings) -> None:
        parts = urlsplit(settings.url)
        self.host, self.port = parts.hostname or "", parts.port or 6514
        self.timeout = settings.timeout_seconds
        self.context: ssl.SSLContext | None = None
        if parts.scheme == "tls":
            self.context = ssl.create_default_context(cafile=settings.ca_file or None)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_2
            if settings.cert_file:
                self.context.load_cert_chain(settings.cert_file, settings.key_file or None)
        self._sock: socket.socket | None = None

    def encode(self, entry: AuditEvent, source: Source, patient_id: str | None) -> bytes | None:
        return syslog_frame(entry, source, patient_id)

    def send(self, frames: list[bytes]) -> None:
        """Write `frames`; returns once the write completed on a connection the repository had not closed."""
        try:
            if self._sock is not None and self._closed_by_peer():
                self.close()
            if self._sock is None:
                self._sock = self._connect()
            self._sock.sendall(b"".join(frames))
            if self._closed_by_peer():
                raise RepositoryUnavailable("the repository closed the connection")
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise RepositoryUnavailable(type(exc).__name__) from exc
        except RepositoryUnavailable:
            self.close()
            raise

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.context is None:
            return raw
        try:
            tls = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        self._sock = tls
        if self._refused_within(ACCEPTANCE_SECONDS):
            raise RepositoryUnavailable("the repository refused our certificate after the handshake")
        return tls

    def _refused_within(self, seconds: float) -> bool:
        """Whether the repository closes the new connection within `seconds`. With TLS 1.3 the server judges
        our certificate (and rsyslog its name) after our side of the handshake is done: entries written at once
        went into a connection about to be refused. A session ticket read meanwhile is no refusal."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            assert self._sock is not None
            readable, _, _ = select.select([self._sock], [], [], left)
            if readable and self._closed_by_peer():
                return True
            if readable:
                time.sleep(0.01)
        return False

    def _closed_by_peer(self) -> bool:
        """Whether the repository closed (or reset) the connection: a syslog receiver never writes, so
        anything readable is its close_notify, its FIN or an error."""
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        try:
            self._sock.setblocking(False)
            try:
                return self._sock.recv(1) == b""
            finally:
                self._sock.setblocking(True)
        except ssl.SSLWantReadError:
            return False
        except (OSError, ssl.SSLError):
            return True


@dataclass
class Forwarder:
    """Forwards the audit log of `engine` to the repository of `settings`, from the feed's cursor on."""

    engine: Engine
    settings: AtnaSettings
    source: Source = field(default_factory=Source)
    stop: threading.Event = field(default_factory=threading.Event)
    active: bool = False  # holds the lock: this is the one forwarder sending
    _lock_connection: Connection | None = None

    def __post_init__(self) -> None:
        udp = urlsplit(self.settings.url).scheme == "udp"
        self.connection: Transport = SyslogUdp(self.settings) if udp else SyslogTls(self.settings)

    def run(self) -> None:
        """Forward until `stop` is set: stand by while another forwarder holds the lock, back off while the
        repository or the database is unavailable."""
        pause = 0.5
        try:
            while not self.stop.is_set():
                if not self._hold_lock():
                    self.stop.wait(self.settings.poll_seconds)
                    continue
                try:
                    sent = self.forward_once()
                except (RepositoryUnavailable, SQLAlchemyError) as exc:
                    if isinstance(exc, SQLAlchemyError):  # the lock may have gone with the database
                        self._release_lock()
                    log.warning(
                        "atna.repository_unavailable"
                        if isinstance(exc, RepositoryUnavailable)
                        else "atna.database_unavailable",
                        feed=self.settings.feed,
                        error=str(exc) if isinstance(exc, RepositoryUnavailable) else type(exc).__name__,
                        retry_in=pause,
                    )
                    self.stop.wait(pause)
                    pause = min(pause * 2, self.settings.backoff_max_seconds)
                    continue
                pause = 0.5
                if sent == 0:
                    self.stop.wait(self.settings.poll_seconds)
        finally:
            self.connection.close()
            self._release_lock()

    def forward_once(self) -> int:
        """Send the entries after the cursor (one batch) and move the cursor past them; how many were sent."""
        cursor = self._cursor()
        entries = audit.entries(self.engine, after=cursor, limit=self.settings.batch)
        if entries:
            patients = patients_of(self.engine, [e.case_id for e in entries if e.case_id])
            encode = self.connection.encode
            encoded = [(e, encode(e, self.source, patients.get(e.case_id or ""))) for e in entries]
            ready = [(e, message) for e, message in encoded if message is not None]
            try:
                self.connection.send([message for _, message in ready])
            except RepositoryUnavailable as exc:
                # UDP: the datagrams handed over are gone; sent again, they would arrive twice.
                if exc.delivered:
                    through = ready[exc.delivered - 1][0].id
                    assert through is not None
                    self._move_cursor(through)
                    SENT.labels(self.settings.feed).inc(exc.delivered)
                raise
            last = entries[-1].id
            assert last is not None
            self._move_cursor(last)
            cursor = last
            SENT.labels(self.settings.feed).inc(len(entries))
            log.info("atna.forwarded", feed=self.settings.feed, entries=len(entries), through=last)
        # At most this many wait (ids of rolled-back entries are never used): no count over the backlog per batch.
        with Session(self.engine) as session:
            BACKLOG.labels(self.settings.feed).set(newest_id(session) - cursor)
        return len(entries)

    def _cursor(self) -> int:
        with Session(self.engine) as session:
            row = session.get(ForwardCursor, self.settings.feed)
            if row is not None:
                return row.forwarded_through
            start = newest_id(session) if self.settings.start == "now" else 0
            session.add(ForwardCursor(feed=self.settings.feed, forwarded_through=start))
            session.commit()
            log.info("atna.feed_started", feed=self.settings.feed, after=start)
            return start

    def _move_cursor(self, through: int) -> None:
        with Session(self.engine) as session:
            row = session.get(ForwardCursor, self.settings.feed)
            assert row is not None
            row.forwarded_through, row.updated_at = through, utcnow()
            session.commit()

    def _hold_lock(self) -> bool:
        if self.engine.dialect.name != "postgresql":
            self.active = True  # SQLite: one process on a laptop
            return True
        try:
            if self._lock_connection is None:
                self._lock_connection = self.engine.connect()
                got = self._lock_connection.execute(
                    text("SELECT pg_try_advisory_lock(CAST(:space AS integer), CAST(:key AS integer))"),
                    {"space": FORWARDER_LOCKS, "key": _lock_key(self.settings.feed)},
                ).scalar()
                self._lock_connection.commit()
                if not got:
                    self._release_lock()
                    if self.active:
                        log.info("atna.standing_by", feed=self.settings.feed)
                    self.active = False
                    return False
                log.info("atna.forwarding", feed=self.settings.feed)
            else:
                self._lock_connection.execute(text("SELECT 1"))  # still ours: the session holds the lock
                self._lock_connection.commit()
        except Exception as exc:  # noqa: BLE001 -- the database went away: the lock went with it
            log.warning("atna.lock_lost", feed=self.settings.feed, error=type(exc).__name__)
            self._release_lock()
            self.active = False
            return False
        self.active = True
        return True

    def _release_lock(self) -> None:
        if self._lock_connection is not None:
            with contextlib.suppress(Exception):  # already gone
                self._lock_connection.close()  # the session ends: PostgreSQL releases its advisory lock
            self._lock_connection = None


def patients_of(engine: Engine, case_ids: list[str]) -> dict[str, str]:
    """The referring facility's patient id (MRN) of each case: as records, insurance and review registered it
    with the case's owner from the case workflow's commands, or, for a case they have not seen yet (intake's
    own entries, the first seconds of a case), from intake's copy of the request, where this PostgreSQL
    database holds intake's schema (one database for every service; on Kubernetes, intake's own)."""
    wanted = sorted(set(case_ids))
    if not wanted:
        return {}
    with Session(engine) as session:
        rows = session.exec(
            sql_select(CaseOwner.case_id, CaseOwner.patient_id).where(
                col(CaseOwner.case_id).in_(wanted), col(CaseOwner.patient_id).is_not(None)
            )
        ).all()
    found = {case_id: patient_id for case_id, patient_id in rows if patient_id}
    missing = [case_id for case_id in wanted if case_id not in found]
    if missing and _holds_intake_cases(engine):
        query = text("SELECT id, request_json FROM intake.cases WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
        with engine.connect() as conn:
            for case_id, request_json in conn.execute(query, {"ids": missing}):
                mrn = json.loads(request_json).get("patient", {}).get("mrn")
                if isinstance(mrn, str) and mrn:
                    found[case_id] = mrn
    return found


def _holds_intake_cases(engine: Engine) -> bool:
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT to_regclass('intake.cases') IS NOT NULL")).scalar())


def _lock_key(feed: str) -> int:
    return int.from_bytes(hashlib.blake2b(feed.encode(), digest_size=4).digest(), "big", signed=True)


def newest_id(session: Session) -> int:
    return int(session.exec(sql_select(func.max(AuditEvent.id))).one() or 0)


DELIVERY = {
    "tls": "at least once: the cursor moves once the repository's connection took the entries",
    "tcp": "at least once: the cursor moves once the repository's connection took the entries",
    "udp": "at most once: UDP has no acknowledgement, the cursor moves once each datagram is handed to the kernel",
}


def backlog(engine: Engine, settings: AtnaSettings) -> dict[str, Any]:
    """The feed's state for operations: the cursor, the newest entry, how many wait, since when."""
    with Session(engine) as session:
        row = session.get(ForwardCursor, settings.feed)
        through = row.forwarded_through if row else 0
        waiting = session.exec(
            sql_select(func.count()).select_from(AuditEvent).where(col(AuditEvent.id) > through)
        ).one()
        oldest = session.exec(sql_select(func.min(AuditEvent.at)).where(col(AuditEvent.id) > through)).one()
        scheme = urlsplit(settings.url).scheme
        return {
            "feed": settings.feed,
            "enabled": bool(settings.url),
            "transport": scheme or None,
            "delivery": DELIVERY.get(scheme),
            "forwarded_through": through,
            "newest": newest_id(session),
            "backlog": int(waiting),
            "oldest_waiting_at": oldest.isoformat() if isinstance(oldest, datetime) else None,
            "cursor_moved_at": row.updated_at.isoformat() if row else None,
        }


def run_forever(engine: Engine, settings: AtnaSettings, stop: threading.Event | None = None) -> None:
    forwarder = Forwarder(engine, settings, Source(settings.app_name, settings.site_id))
    if stop is not None:
        forwarder.stop = stop
    forwarder.run()


__all__ = [
    "AtnaSettings",
    "Forwarder",
    "RepositoryUnavailable",
    "backlog",
    "get_atna_settings",
    "syslog_frame",
    "syslog_message",
]
