"""HL7 v2 orders in: intake's MLLP listener (python-hl7's asyncio server) taking ORM^O01 and OMG^O19 from a
partner's interface engine, each answered with an ACK on the same connection (original mode).

Who is sending is never read from MSH-3 / MSH-4 alone: outside development the listener speaks TLS only and
requires a client certificate from a CA in INTAKE_MLLP_CLIENT_CAS; a message is taken when the certificate's
SHA-256 fingerprint, MSH-3 and MSH-4 match one enabled `Hl7Sender`, whose partner owns the case. In development,
without TLS settings, plain MLLP is taken from loopback only, matched on MSH-3 / MSH-4 alone. Anything else is an
AR saying what to do, and an audit entry.

Exactly once: the (sender, MSH-10) pair is claimed as an idempotency key (`idempotency`, as the case API's
`Idempotency-Key` and partner webhooks' ids are: owner `hl7-sender:{id}`) before the order is processed and its ACK
kept there, so a resend (after a lost ACK) is answered the same ACK and creates nothing; the hourly purge forgets
it after idempotency.KEEP_FOR. A new order goes through
the case API's own `open_case` (validation, the existing case for a placer order number, the workflow's start);
a cancel through the workflow's `cancel` update, as the API's. A failure that a resend may cure (the database or
Temporal unreachable) releases the claim and answers AE saying to resend.

The database is sync SQLModel: every query runs on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hl7.mllp
import structlog
from fastapi import HTTPException
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client

from contracts.decisions import CancelCase
from contracts.triage import Reason
from services.auth import audit as audit_log
from services.auth.deps import Principal
from services.auth.models import Role
from services.common.config import Settings
from services.common.errors import IntakeRejected
from services.intake import decisions, handlers, hl7_orm, idempotency
from services.intake.api import CLOSED, open_case
from services.intake.hl7_orm import APPLICATION_ERROR, ErrorItem, Header, OrderInvalid
from services.intake.models import Case, Hl7Sender

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024  # an order is a few kB; its documents go to records
# The port faces the internet: a connection that sends nothing (before the TLS handshake ends, or between
# messages) is closed, so idle or half-open sockets cannot pile up; an engine reconnects when it has a message.
IDLE_SECONDS = 300.0
HANDSHAKE_SECONDS = 15.0
MAX_CONNECTIONS = 64  # at once; one more is closed at once (an engine keeps one or a few)
ACKNOWLEDGED = 200  # the stored answer's status: the body is the ACK itself
UNKNOWN = Header("", "", "", "", "", "")
REGISTER = (
    "register your engine as an HL7 sender of your partner (POST /v1/partners/{partner_id}/hl7-senders with "
    "MSH-3, MSH-4 and your client certificate's SHA-256), and send over TLS with that certificate"
)


@dataclass(frozen=True)
class Peer:
    """The connection a message came on: the peer's address and its client certificate's SHA-256 (TLS)."""

    address: str
    certificate_sha256: str | None
    tls: bool

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False


class Retry(Exception):
    """A failure a resend may cure: the claim is released and the ACK (AE) says to resend."""


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS: its certificate, and client certificates required from the CAs given; None when no
    TLS setting is given (development only, see Settings.mllp_problems)."""
    given = (settings.intake_mllp_tls_cert, settings.intake_mllp_tls_key, settings.intake_mllp_client_cas)
    if not any(given):
        return None
    if not all(given):
        raise SystemExit(
            "INTAKE_MLLP_TLS_CERT, INTAKE_MLLP_TLS_KEY and INTAKE_MLLP_CLIENT_CAS go together: set all three "
            "(MLLP over TLS with client certificates) or, in development only, none"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(settings.intake_mllp_client_cas))
    context.load_cert_chain(str(settings.intake_mllp_tls_cert), str(settings.intake_mllp_tls_key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class OrderListener:
    """The MLLP listener; `start` and `stop` from intake's lifespan."""

    def __init__(
        self,
        engine: Engine,
        auth: Engine,
        settings: Settings,
        temporal: Callable[[], Awaitable[Client | None]],
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        idle_seconds: float = IDLE_SECONDS,
        handshake_seconds: float = HANDSHAKE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if tls is None and settings.env != "dev":
            raise SystemExit("refusing to listen for HL7 orders:\n- " + "\n- ".join(settings.mllp_problems()))
        self.engine = engine
        self.auth = auth
        self.settings = settings
        self.temporal = temporal
        self.host = host
        self.wanted_port = port
        self.tls = tls
        self.idle_seconds = idle_seconds
        self.handshake_seconds = handshake_seconds
        self.max_connections = max_connections
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await hl7.mllp.start_hl7_server(
            self._serve,
            self.host,
            self.wanted_port,
            limit=MAX_MESSAGE_BYTES,
            ssl=self.tls,
            ssl_handshake_timeout=self.handshake_seconds if self.tls is not None else None,
        )
        log.info("hl7_in.listening", port=self.port, tls=self.tls is not None)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            peer = peer_of(writer)
            if len(self._connections) > self.max_connections:
                log.warning("hl7_in.too_many_connections", connections=len(self._connections))
                return
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.idle_seconds)
                except TimeoutError:
                    log.info("hl7_in.idle_closed", seconds=self.idle_seconds)
                    return
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return  # the engine closed the connection
                except (hl7.mllp.InvalidBlockError, ValueError):
                    log.info("hl7_in.unframed", error="not an MLLP block, or over 1 MB")
                    return
                try:
                    answer = await self.answer(block, peer)
                except Exception as exc:  # e.g. the audit log unreachable: no ACK, so the engine resends
                    log.warning("hl7_in.unanswered", error=type(exc).__name__)
                    return
                writer.writeblock(answer.encode("utf-8"))
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, block: bytes, peer: Peer) -> str:
        """The ACK to one message."""
        try:
            header = hl7_orm.read_header(block)
        except OrderInvalid as exc:
            await asyncio.to_thread(self._audit_denied, peer, None, "a block that is not an HL7 v2 message")
            return hl7_orm.ack(
                UNKNOWN, "AR", new_control_id(), "not an HL7 v2 message; nothing was stored", exc.errors
            )
        sender, denial = await asyncio.to_thread(self._identify, header, peer)
        if sender is None:
            partner_id = await asyncio.to_thread(self._partner_of_certificate, peer)
            await asyncio.to_thread(self._audit_denied, peer, partner_id, denial)
            error = ErrorItem("MSH^1^3", APPLICATION_ERROR, f"{denial}; {REGISTER}")
            return hl7_orm.ack(
                header, "AR", new_control_id(), "sender not recognized; nothing was stored", [error]
            )
        if not header.control_id:
            error = ErrorItem("MSH^1^10", hl7_orm.REQUIRED_MISSING, "MSH-10 (message control id) is required")
            return hl7_orm.ack(header, "AR", new_control_id(), "nothing was stored", [error])
        owner, key = f"hl7-sender:{sender.id}", header.control_id
        try:
            stored = await asyncio.to_thread(
                idempotency.claim, self.engine, owner, key, hl7_orm.fingerprint(block)
            )
        except idempotency.KeyReusedWithOtherBody:
            error = ErrorItem("MSH^1^10", APPLICATION_ERROR,
                              "this control id was already used for another message from your engine; give each "
                              "message its own MSH-10")  # fmt: skip
            return hl7_orm.ack(header, "AR", new_control_id(), "nothing was stored", [error])
        except idempotency.StillRunning:
            return retry_ack(header, "the first message with this control id is still being processed")
        except Exception as exc:
            log.warning("hl7_in.claim_failed", error=type(exc).__name__)
            return retry_ack(header, "the order could not be recorded now")
        if stored is not None:
            log.info("hl7_in.resend", sender_id=sender.id)
            return str(stored.body)
        try:
            code, text, errors, case_id = await self._process(block, sender, peer)
        except Retry as exc:
            await asyncio.to_thread(idempotency.release, self.engine, owner, key)
            return retry_ack(header, str(exc))
        except Exception as exc:
            await asyncio.to_thread(idempotency.release, self.engine, owner, key)
            log.warning("hl7_in.failed", sender_id=sender.id, error=type(exc).__name__)
            return retry_ack(header, "the order could not be processed now")
        answer = hl7_orm.ack(header, code, new_control_id(), text, errors)
        await asyncio.to_thread(idempotency.complete, self.engine, owner, key, ACKNOWLEDGED, answer)
        log.info("hl7_in.answered", sender_id=sender.id, ack=code, case_id=case_id)
        return answer

    async def _process(
        self, block: bytes, sender: Hl7Sender, peer: Peer
    ) -> tuple[str, str, list[ErrorItem], str | None]:
        """(MSA-1, MSA-3, ERRs, case id) for a message of a known sender."""
        rules = hl7_orm.SenderRules(
            default_reason=Reason(sender.default_reason) if sender.default_reason else None,
            exam_codes=json.loads(sender.exam_codes or "{}"),
        )
        try:
            order = hl7_orm.read_order(block, rules)
        except OrderInvalid as exc:
            return (
                ("AR" if exc.reject else "AE"),
                "the order was not taken; nothing was stored",
                exc.errors,
                None,
            )
        caller = Principal(key_id=f"hl7-sender:{sender.id}", role=Role.PARTNER, partner_id=sender.partner_id)
        audit = MllpAudit(self.auth, caller, peer)
        if order.control == "CA":
            return await self._cancel(order, caller, audit)
        assert order.case is not None
        temporal = await self.temporal()
        try:
            case, created = await open_case(
                order.case, [], caller, audit, self.engine, temporal, self.settings
            )
        except IntakeRejected as exc:
            return (
                "AE",
                "the order was not taken; nothing was stored",
                [ErrorItem("", APPLICATION_ERROR, str(exc))],
                None,
            )
        except HTTPException as exc:
            if exc.status_code >= 500:
                raise Retry(str(exc.detail)) from exc
            error = ErrorItem(
                "ORC^1^2",
                APPLICATION_ERROR,
                str(exc.detail).replace("partner_case_ref", "the placer order number"),
            )
            return "AE", "the order was not taken; nothing was stored", [error], None
        if created is None:
            return (
                "AA",
                f"case {case.id}: this placer order already has this case; nothing new was created",
                [],
                case.id,
            )
        return (
            "AA",
            f"case {case.id} created; its results come as ORU^R01 with {case.id} in OBR-3",
            [],
            case.id,
        )

    async def _cancel(
        self, order: hl7_orm.Order, caller: Principal, audit: MllpAudit
    ) -> tuple[str, str, list[ErrorItem], str | None]:
        partner_id = str(caller.partner_id)
        case = await asyncio.to_thread(find_case, self.engine, order.placer, order.placer_system, partner_id)
        if case is None:
            error = ErrorItem("ORC^1^2", APPLICATION_ERROR,
                              "no case of yours for this placer order number (and its EI.3 system); nothing was "
                              "cancelled")  # fmt: skip
            return "AE", "nothing was cancelled", [error], None
        if case.status in CLOSED:
            error = ErrorItem(
                "ORC^1^1", APPLICATION_ERROR, f"the case is already {case.status}; nothing to cancel"
            )
            return "AE", f"case {case.id}: nothing was cancelled", [error], case.id
        decision = CancelCase(by=caller.actor, reason="cancelled by the hospital's order (ORC-1 CA)")
        try:
            await decisions.cancel(await self.temporal(), case.id, decision)
        except decisions.WorkflowRejected as exc:
            await asyncio.to_thread(audit, "update", "case.cancel", case.id, "failed", "rejected by workflow")
            error = ErrorItem("ORC^1^1", APPLICATION_ERROR, f"the case cannot be cancelled: {exc}")
            return "AE", f"case {case.id}: nothing was cancelled", [error], case.id
        except decisions.WorkflowUnreachable as exc:
            raise Retry(str(exc)) from exc
        await asyncio.to_thread(audit, "update", "case.cancel", case.id, "success")
        return "AA", f"case {case.id} cancelled", [], case.id

    def _identify(self, header: Header, peer: Peer) -> tuple[Hl7Sender | None, str]:
        """The one enabled sender this message comes from, or None and why not (never a value sent)."""
        if not peer.tls and not (self.settings.env == "dev" and peer.loopback):
            return None, "plain MLLP is taken from loopback in development only"
        if not header.sending_application or not header.sending_facility:
            return None, "MSH-3 (sending application) and MSH-4 (sending facility) are required"
        with Session(self.engine) as session:
            query = select(Hl7Sender).where(
                Hl7Sender.sending_application == header.sending_application,
                Hl7Sender.sending_facility == header.sending_facility,
                col(Hl7Sender.disabled_at).is_(None),
            )
            if peer.certificate_sha256 is not None:
                query = query.where(Hl7Sender.certificate_sha256 == peer.certificate_sha256)
            found = list(session.exec(query.limit(2)).all())
        if len(found) == 1:
            return found[0], ""
        if found:
            return (
                None,
                "MSH-3 and MSH-4 name more than one enabled sender; connect over TLS with your certificate",
            )
        return None, "no enabled sender is registered with this MSH-3, MSH-4 and client certificate"

    def _partner_of_certificate(self, peer: Peer) -> str | None:
        """The partner whose sender holds the presented certificate (for the audit entry), if any."""
        if peer.certificate_sha256 is None:
            return None
        with Session(self.engine) as session:
            sender = session.exec(
                select(Hl7Sender)
                .where(
                    Hl7Sender.certificate_sha256 == peer.certificate_sha256,
                    col(Hl7Sender.disabled_at).is_(None),
                )
                .order_by(col(Hl7Sender.created_at).desc())
                .limit(1)
            ).first()
        return sender.partner_id if sender else None

    def _audit_denied(self, peer: Peer, partner_id: str | None, detail: str) -> None:
        audit_log.record(
            self.auth,
            actor="mllp",
            partner_id=partner_id,
            role=None,
            service="intake",
            action="create",
            resource="hl7-order",
            outcome="denied",
            detail=f"HL7 v2 order refused: {detail}",
            network_address=peer.address[:64],
        )


class MllpAudit:
    """The audit entries of an order taken from a known sender, as the case API's `Audit` writes them."""

    def __init__(self, auth: Engine, caller: Principal, peer: Peer) -> None:
        self.auth = auth
        self.caller = caller
        self.peer = peer

    def __call__(
        self, action: str, resource: str, case_id: str | None, outcome: str, detail: str = ""
    ) -> None:
        audit_log.record(
            self.auth,
            actor=self.caller.actor,
            partner_id=self.caller.partner_id,
            role=Role.PARTNER.value,
            service="intake",
            action=action,
            resource=resource,
            case_id=case_id,
            outcome=outcome,
            detail=f"HL7 v2 over MLLP; {detail}" if detail else "HL7 v2 over MLLP",
            network_address=self.peer.address[:64],
        )


def peer_of(writer: hl7.mllp.HL7StreamWriter) -> Peer:
    name = writer.get_extra_info("peername")
    address = str(name[0]) if isinstance(name, tuple) and name else ""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return Peer(address=address, certificate_sha256=None, tls=False)
    der = ssl_object.getpeercert(binary_form=True)
    return Peer(
        address=address, certificate_sha256=hashlib.sha256(der).hexdigest() if der else None, tls=True
    )


def new_control_id() -> str:
    return uuid.uuid4().hex[:20].upper()


def retry_ack(header: Header, why: str) -> str:
    error = ErrorItem("", APPLICATION_ERROR, f"{why}; nothing was stored: send the message again in a minute")
    return hl7_orm.ack(header, "AE", new_control_id(), "resend later", [error])


def find_case(engine: Engine, placer: str, system: str | None, partner_id: str) -> Case | None:
    with Session(engine, expire_on_commit=False) as session:
        return handlers.existing_case(placer, system, partner_id, session)
