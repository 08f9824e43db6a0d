"""AMQP with pika: topology, a confirming publisher, an inbox consumer and the outbox relay.

- Every process declares the whole topology at start, so no publish is unroutable for want of a queue.
- Publishers use publisher confirms and `mandatory=True`: a message is either confirmed or an error.
- Consumers apply a message, record its id in the inbox and commit in one transaction, then ack.
  Messages that arrive together are applied in order in one such transaction and acked together; if
  any of them fails, none of the batch is kept and they are applied one by one. A handler error is
  retried by redelivery up to the quorum queue's `x-delivery-limit`, then dead-lettered; an unreachable
  database is waited for with backoff, without a redelivery. A `PoisonMessage`, or a value the database
  refuses (`DataError`), is dead-lettered at once with its reason.
- Publishing from a transaction goes through the outbox table; the relay publishes and marks it.

A pika connection belongs to one thread: each consumer, relay and publisher owns its own.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
import structlog
from opentelemetry.trace import Span
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session, col, select

from contracts.envelope import CloudEvent
from contracts.validation import fields_of
from services.common.config import Settings
from services.common.crashpoints import crash_point
from services.common.db import ADDED, Inbox, Outbox, insert_new, insert_skipping_taken
from services.common.errors import PoisonMessage
from services.common.tracing import consumer_span, current_trace_headers, trace_headers_of

log = structlog.get_logger(__name__)

COMMANDS = "case.commands"
EVENTS = "case.events"
DEAD_LETTERS = "case.dlx"

# A message whose database is unreachable is retried in place, pausing 0.5 s, 1 s, 2 s ... up to 10 s, for up to
# five minutes; after that it is redelivered as any failed message is.
DATABASE_FIRST_PAUSE_SECONDS = 0.5
DATABASE_LONGEST_PAUSE_SECONDS = 10.0
DATABASE_PATIENCE_SECONDS = 300.0

# queue -> (exchange, binding key) pairs. One quorum queue per consumer, each with its dead-letter queue.
QUEUES: dict[str, list[tuple[str, str]]] = {
    "intake": [
        (COMMANDS, "report.deliver"),
        (EVENTS, "case.status_changed"),
        (EVENTS, "case.cancelled"),
        (EVENTS, "case.alert"),
        (EVENTS, "records.needed"),
        (EVENTS, "report.ready"),
    ],
    "records": [
        (COMMANDS, "records.*"),
        (EVENTS, "case.cancelled"),
        (EVENTS, "document.encapsulated_report"),
    ],
    "insurance": [(COMMANDS, "insurance.*"), (EVENTS, "case.cancelled")],
    "review": [(COMMANDS, "review.*"), (COMMANDS, "report.compose"), (EVENTS, "case.cancelled")],
    "workflows.bridge": [
        (EVENTS, "records.*"),
        (EVENTS, "insurance.*"),
        (EVENTS, "review.*"),
        (EVENTS, "report.*"),
    ],
}


def _watch_rollbacks(session: Session) -> list[object]:
    """A list that gets an entry each time the session's whole transaction is rolled back (a savepoint's
    rollback keeps the rest and is not counted)."""
    rollbacks: list[object] = []

    @event.listens_for(session, "after_soft_rollback")
    def _rolled_back(_: Session, previous: SessionTransaction) -> None:
        if previous.parent is None:
            rollbacks.append(previous)

    return rollbacks


HANDLING = "consumer.handling"  # session.info key: a message handler is running in this session


class HandlerCommitted(RuntimeError):
    """A message handler tried to commit the consumer's transaction (only the consumer commits it)."""


def _refuse_handler_commits(session: Session) -> None:
    """The consumer's transaction holds the inbox rows of its messages: a handler that committed it would make
    messages not yet applied look applied (and lose them if a later one failed), or keep half an effect."""

    @event.listens_for(session, "before_commit")
    def _before_commit(committing: Session) -> None:
        # A savepoint's release (begin_nested) keeps the outer transaction open: that one is allowed.
        if committing.info.get(HANDLING) and not committing.in_nested_transaction():
            raise HandlerCommitted("a message handler must not commit; the consumer commits its transaction")


@contextlib.contextmanager
def _handling(session: Session) -> Iterator[None]:
    session.info[HANDLING] = True
    try:
        yield
    finally:
        session.info[HANDLING] = False


def _claim_statement(session: Session) -> Any:
    """INSERT INTO inbox ... ON CONFLICT DO NOTHING RETURNING message_id, for the session's database."""
    table = Inbox.__table__  # type: ignore[attr-defined]
    return insert_skipping_taken(session.get_bind().dialect.name, table).returning(table.c.message_id)


class BatchBroken(Exception):
    """A batch of messages could not be applied as one transaction; its messages are applied one by one."""


class PublishFailed(Exception):
    """The broker did not confirm a message (nacked or unroutable); the caller must retry."""


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def connect(settings: Settings) -> pika.BlockingConnection:
    params = pika.URLParameters(settings.amqp_url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": "secondopinion"}
    return pika.BlockingConnection(params)


def declare_topology(channel: BlockingChannel, settings: Settings) -> None:
    for exchange in (COMMANDS, EVENTS, DEAD_LETTERS):
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    for queue, bindings in QUEUES.items():
        dlq = dead_letter_queue(queue)
        channel.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(dlq, DEAD_LETTERS, routing_key=queue)
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": DEAD_LETTERS,
                "x-dead-letter-routing-key": queue,
                "x-delivery-limit": settings.amqp_delivery_limit,
            },
        )
        for exchange, key in bindings:
            channel.queue_bind(queue, exchange, routing_key=key)


def ensure_topology(settings: Settings) -> None:
    conn = connect(settings)
    try:
        declare_topology(conn.channel(), settings)
    finally:
        conn.close()


@dataclass
class Publisher:
    """Publishes with confirms and `mandatory`. Not thread-safe: one per thread."""

    settings: Settings
    _conn: pika.BlockingConnection | None = None
    _channel: BlockingChannel | None = None

    def _ensure(self) -> BlockingChannel:
        if self._conn is None or self._conn.is_closed or self._channel is None or self._channel.is_closed:
            self.close()
            self._conn = connect(self.settings)
            self._channel = self._conn.channel()
            self._channel.confirm_delivery()
        return self._channel

    def publish_raw(
        self, exchange: str, routing_key: str, body: bytes, message_id: str, headers: dict | None = None
    ) -> None:
        props = BasicProperties(
            message_id=message_id,
            content_type="application/cloudevents+json",
            delivery_mode=pika.DeliveryMode.Persistent,
            type=routing_key,
            timestamp=int(time.time()),
            headers=headers or {},
        )
        for attempt in (1, 2):
            try:
                self._ensure().basic_publish(exchange, routing_key, body, props, mandatory=True)
                crash_point("publish.after_send_before_confirmed")
                return
            except pika.exceptions.UnroutableError as exc:
                raise PublishFailed(f"{routing_key} on {exchange} reached no queue") from exc
            except pika.exceptions.NackError as exc:
                raise PublishFailed(f"the broker refused {routing_key} ({message_id})") from exc
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                self.close()
                if attempt == 2:
                    raise

    def publish(self, exchange: str, event: CloudEvent) -> None:
        event = with_trace(event)
        self.publish_raw(
            exchange, event.type, event.to_bytes(), event.id, headers=trace_headers_of(event.to_bytes())
        )

    def close(self) -> None:
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:  # noqa: S110 - closing a broken connection may fail; nothing to do
            pass
        self._conn = None
        self._channel = None


def with_trace(event: CloudEvent) -> CloudEvent:
    """The event carrying the current trace as the CloudEvents distributed-tracing extension."""
    if getattr(event, "traceparent", None):
        return event
    headers = current_trace_headers()
    # A copy with the two extension attributes added: dumping and validating the whole envelope again
    # cost a tenth of the review service's CPU for its large report events.
    return event.model_copy(update=headers) if headers else event


def enqueue(session: Session, exchange: str, event: CloudEvent) -> None:
    """Add `event` to the outbox in the caller's transaction; the relay publishes it after commit."""
    event = with_trace(event)
    # An id already queued (a re-applied message) is skipped by the insert itself.
    insert_new(
        session,
        [Outbox(message_id=event.id, exchange=exchange, routing_key=event.type, body=event.to_bytes())],
    )


Handler = Callable[[Session, CloudEvent], None]


ENVELOPE_CONTENT_TYPE = "application/cloudevents+json"
JSON_KINDS = {"[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}  # by first character


def decode_envelope(body: bytes, content_type: str | None = None) -> CloudEvent:
    """The message's CloudEvent, or `PoisonMessage` saying what is wrong with it (redelivery cannot mend it):
    the bad fields, or what the body is when it is no JSON object. Never a value: it may be PHI.

    CloudEvents' AMQP binding tells the modes apart by the content type: structured mode (the whole event,
    JSON format, in the body) is `application/cloudevents+json`, which our publishers set; any other type
    (`application/json`, a batch, XML) is another mode or format, which nothing here reads, and is refused
    whatever the body. A message without one (an operator's hand-written publish) is read as structured
    mode. The envelope's `datacontenttype` must say JSON: `data` is read as a JSON object."""
    if content_type is not None and (refused := _content_type_problem(content_type)):
        raise PoisonMessage(f"not a CloudEvents 1.0 JSON envelope ({refused})")
    try:
        event = CloudEvent.model_validate_json(body)
    except ValidationError as exc:
        raise PoisonMessage(f"not a CloudEvents 1.0 JSON envelope ({_envelope_problem(body, exc)})") from exc
    # CloudEvents requires `specversion`; the model defaults it only for the events this platform builds.
    if "specversion" not in event.model_fields_set:
        raise PoisonMessage("not a CloudEvents 1.0 JSON envelope (bad fields: specversion)")
    if not _is_json(event.datacontenttype):
        raise PoisonMessage(
            f"{event.type} says its data is {_shown(event.datacontenttype)} (datacontenttype); data is read as "
            "a JSON object: send it with datacontenttype application/json, or leave the attribute out"
        )
    return event


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """`type/subtype` in lower case, and the parameters (names in lower case, quotes taken off)."""
    kind, *parameters = value.split(";")
    found = {}
    for parameter in parameters:
        name, _, setting = parameter.partition("=")
        found[name.strip().lower()] = setting.strip().strip('"')
    return kind.strip().lower(), found


def _shown(value: str) -> str:
    """A content type as the reason may quote it: a media type, never whatever else a header held."""
    kind = _media_type(value)[0]
    return repr(kind) if _MEDIA_TYPE.fullmatch(kind) else "no media type"


def _content_type_problem(content_type: str) -> str | None:
    kind, parameters = _media_type(content_type)
    if kind != ENVELOPE_CONTENT_TYPE:
        mode = (
            "a batch of events, which is not taken"
            if kind == "application/cloudevents-batch+json"
            else "another event format, which is not taken"
            if kind.startswith("application/cloudevents")
            else "binary mode (the data alone, its attributes in headers), which is not taken"
        )
        return (
            f"sent as content type {_shown(content_type)}, not {ENVELOPE_CONTENT_TYPE}: that is {mode}; "
            f"publish the whole event as JSON with content type {ENVELOPE_CONTENT_TYPE}"
        )
    if parameters.get("charset", "utf-8").lower() not in ("utf-8", "utf8"):
        return f"sent with a charset other than UTF-8; JSON is UTF-8: send {ENVELOPE_CONTENT_TYPE}"
    return None


def _is_json(datacontenttype: str) -> bool:
    kind = _media_type(datacontenttype)[0]
    return kind in ("application/json", "text/json") or kind.endswith("+json")


def contract_message(event: CloudEvent, models: Mapping[str, type[BaseModel]], handler: str) -> BaseModel:
    """The event's data as its contract model, or `PoisonMessage` saying what no redelivery can mend: a type
    `handler` does not take, data that is not its model (the bad fields, never their values: they may be PHI),
    or data about another case than the event's subject (handlers find the case by the one, partners by the
    other, so they must agree)."""
    model = models.get(event.type)
    if model is None:
        raise PoisonMessage(
            f"{handler} does not handle {event.type!r}; it handles {', '.join(sorted(models))}"
        )
    try:
        message = model.model_validate(event.data)
    except ValidationError as exc:
        fields = fields_of(exc, most=10)
        raise PoisonMessage(f"{event.type} data is invalid ({exc.error_count()} error(s): {fields})") from exc
    if getattr(message, "case_id", None) != event.subject:
        raise PoisonMessage(f"{event.type} is about case {event.subject} but its data names another case")
    return message


def _envelope_problem(body: bytes, exc: ValidationError) -> str:
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        try:
            body.decode()
        except UnicodeDecodeError as bad:
            return f"the body is not UTF-8: byte {bad.start} of {len(body)} is not valid"
        return f"the body is not JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}"
    if errors[0]["type"] == "model_type":
        kind = JSON_KINDS.get(body.lstrip()[:1].decode(errors="replace"), "number")
        return f"the body is a JSON {kind}, not an object"
    return "bad fields: " + fields_of(exc, most=5)


def refused_by_database(event: CloudEvent, exc: DataError) -> str:
    """The reason a message whose values the database refused is dead-lettered: the error's kind and SQLSTATE,
    never its text, which may quote the value."""
    kind = type(exc.orig).__name__
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return (
        f"the database refused a value of {event.type} ({kind}{f', SQLSTATE {sqlstate}' if sqlstate else ''});"
        " no redelivery can store it"
    )


def database_unreachable(exc: DBAPIError) -> bool:
    """Whether `exc` says the database could not be reached or dropped the connection (a restart, a failover),
    rather than that the work failed: no connection made (no SQLSTATE), class 08 or an operator's 57P."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return exc.connection_invalidated or (
        isinstance(exc, OperationalError) and (sqlstate is None or sqlstate.startswith(("08", "57P")))
    )


def delivery_attempt(props: BasicProperties) -> int:
    """Which delivery of the message this is. The broker sets `x-delivery-count` on redeliveries only; on a
    first delivery it is whatever the publisher wrote, so anything but a count reads as none."""
    count = (props.headers or {}).get("x-delivery-count", 0)
    return (count if isinstance(count, int) and count >= 0 else 0) + 1


def retry_backoff(props: BasicProperties) -> float:
    """Seconds to wait before a failed message goes back: a transient fault is not burnt through at once."""
    return min(0.2 * delivery_attempt(props), 2.0)


class QueueConsumer:
    """Consumes one queue: poison goes to the dead-letter queue at once, failures are redelivered up to the
    delivery limit, and a message is acked only after `apply` returned."""

    def __init__(self, *, settings: Settings, queue: str) -> None:
        self.settings = settings
        self.queue = queue
        self.prefetch = settings.amqp_prefetch
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._conn: pika.BlockingConnection | None = None

    def apply(self, event: CloudEvent) -> bool:
        """Apply `event`; return False when it was a duplicate that changed nothing."""
        raise NotImplementedError

    def after_ack(self) -> None:
        """Called after a message that changed something was acked."""

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self._conn = connect(self.settings)
                channel = self._conn.channel()
                channel.confirm_delivery()  # dead-lettering a poison message is confirmed before its ack
                declare_topology(channel, self.settings)
                channel.basic_qos(prefetch_count=self.prefetch)
                channel.basic_consume(self.queue, self._on_message)
                self.connected.set()
                log.info("consumer.started", queue=self.queue)
                while not self._stop.is_set():
                    self._conn.process_data_events(time_limit=0.5)
                    self.after_dispatch(channel)
            except pika.exceptions.AMQPError as exc:
                log.warning("consumer.disconnected", queue=self.queue, error=type(exc).__name__)
                self.connected.clear()
                self._stop.wait(2)
            except Exception:
                # A fault of the consumer itself, not of one message (those are settled in `_process_one`):
                # reconnect, so the broker redelivers what was unacked, rather than end the thread and leave
                # the queue unconsumed while the service looks alive.
                log.exception("consumer.crashed", queue=self.queue)
                self.connected.clear()
                self._stop.wait(2)
            finally:
                self.connected.clear()
                try:
                    if self._conn is not None and self._conn.is_open:
                        self._conn.close()
                except pika.exceptions.AMQPError:
                    pass

    def stop(self) -> None:
        self._stop.set()

    def after_dispatch(self, channel: BlockingChannel) -> None:
        """Called on the consumer's thread after each round of deliveries was dispatched."""

    @contextlib.contextmanager
    def message_span(
        self, event: CloudEvent, headers: Mapping[str, Any] | None, message_id: str | None = None
    ) -> Iterator[Span]:
        """The CONSUMER span of one message, continuing the trace its AMQP headers or envelope carry."""
        with consumer_span(f"{self.queue} process {event.type}", headers, event.model_extra) as span:
            span.set_attribute("messaging.message.id", message_id or event.id)
            span.set_attribute("messaging.destination.name", self.queue)
            yield span

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        self._process_one(channel, method, props, body)

    def _process_one(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        message_id = props.message_id or ""
        structlog.contextvars.bind_contextvars(message_id=message_id, queue=self.queue)
        try:
            event = decode_envelope(body, props.content_type)
            structlog.contextvars.bind_contextvars(case_id=event.subject, event_type=event.type)
            with self.message_span(event, props.headers, message_id):
                applied = self.apply(event)
            channel.basic_ack(method.delivery_tag)
            log.info("message.applied" if applied else "message.duplicate_dropped")
            if applied:
                self.after_ack()
        except PoisonMessage as exc:
            log.warning("message.poison", reason=str(exc))
            self._dead_letter(channel, method, props, body, str(exc))
        except Exception as exc:
            log.exception("message.failed", attempt=delivery_attempt(props), error=type(exc).__name__)
            # Back off a little so a transient fault (database restart) is not burnt through at once.
            time.sleep(retry_backoff(props))
            channel.basic_nack(method.delivery_tag, requeue=True)
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "queue", "case_id", "event_type")

    def _dead_letter(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
        reason: str,
    ) -> None:
        headers = dict(props.headers or {})
        headers["x-poison-reason"] = reason[:500]
        headers["x-original-routing-key"] = method.routing_key
        headers["x-original-exchange"] = method.exchange
        dlq_props = BasicProperties(
            message_id=props.message_id,
            content_type=props.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            type=props.type,
            headers=headers,
            timestamp=int(time.time()),  # when it was dead-lettered: `secondopinion dlq list` shows it
        )
        channel.basic_publish(DEAD_LETTERS, self.queue, body, dlq_props, mandatory=True)
        channel.basic_ack(method.delivery_tag)


Delivery = tuple[Basic.Deliver, BasicProperties, bytes]


class Consumer(QueueConsumer):
    """A service's consumer: each message is applied and its id recorded in the inbox in one transaction.

    Messages that arrive together (up to the prefetch count, when the service is behind) are applied in
    order in one transaction and acked together: one inbox statement, one commit and one ack for the lot
    instead of one each. If anything in such a batch fails, none of it is kept and its messages are applied
    one by one as single messages are, so a poison message or a failing handler is dead-lettered or
    redelivered by itself and the others still apply, in their order.

    A batch takes no further message once it has run `batch_seconds` (handlers that call a payer or render a
    PDF are slow): it commits and acks what it applied, and the rest begins the next one. So no transaction
    holds its row locks, and no connection goes without heartbeats, for much longer than one message takes.
    """

    batch_seconds = 2.0

    def __init__(
        self,
        *,
        settings: Settings,
        queue: str,
        engine: Engine,
        handle: Handler,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(settings=settings, queue=queue)
        self.engine = engine
        self.handle = handle
        self.on_commit = on_commit
        # The kinds of rows the last applied message added (Outbox, a service's own): who to wake for it.
        self.last_written: frozenset[type] = frozenset()
        self._pending: list[tuple[BlockingChannel, Basic.Deliver, BasicProperties, bytes]] = []

    def apply(self, event: CloudEvent) -> bool:
        waited, pause = 0.0, DATABASE_FIRST_PAUSE_SECONDS
        while True:
            try:
                return self._apply(event)
            except DataError as exc:
                # A value the database cannot hold (too long, out of range) is refused on every delivery.
                raise PoisonMessage(refused_by_database(event, exc)) from exc
            except DBAPIError as exc:
                # A database restart or failover is not the message's fault: it waits here, unacked, instead
                # of being redelivered, which counts against the delivery limit and dead-letters it in seconds.
                if (
                    not database_unreachable(exc)
                    or waited >= DATABASE_PATIENCE_SECONDS
                    or self._stop.is_set()
                ):
                    raise
                log.warning("database.unavailable", retry_in=pause, error=type(exc.orig).__name__)
                self._pause(pause)
                waited += pause
                pause = min(pause * 2, DATABASE_LONGEST_PAUSE_SECONDS)

    def _pause(self, seconds: float) -> None:
        """Wait on the consumer's thread, answering the broker's heartbeats meanwhile; `stop` cuts it short."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self._conn is not None and self._conn.is_open:
                self._conn.sleep(min(left, 0.5))
            else:
                self._stop.wait(left)

    def _apply(self, event: CloudEvent) -> bool:
        with Session(self.engine, expire_on_commit=False) as session:
            rollbacks = _watch_rollbacks(session)
            _refuse_handler_commits(session)
            if not self._claim(session, [event]):
                return False
            with _handling(session):
                self.handle(session, event)
            if rollbacks and not self._claim(session, [event]):
                # The handler rolled the transaction back, the claim with it, and another replica has
                # claimed the message since: its transaction stands.
                session.rollback()
                return False
            self.last_written = frozenset(session.info.get(ADDED, ()))
            session.commit()
        crash_point("consumer.after_commit_before_ack")
        return True

    def _claim(self, session: Session, events: list[CloudEvent]) -> set[str]:
        """Write the inbox rows of `events` in the session's transaction, skipping ids already there, and
        return the ids written: the messages not applied before. One statement, where a look-up and an
        insert at commit were two. A replica applying the same message concurrently holds its row until
        it commits (then this skips it) or rolls back (then this writes it)."""
        now = datetime.now(UTC)
        rows = {
            e.id: {"message_id": e.id, "queue": self.queue, "message_type": e.type, "processed_at": now}
            for e in events
        }
        return set(session.execute(_claim_statement(session), list(rows.values())).scalars().all())

    def apply_batch(
        self,
        events: list[CloudEvent],
        headers: list[dict | None] | None = None,
        budget: float | None = None,
    ) -> list[bool]:
        """Apply `events` in order in one transaction, the first ones that fit in `budget` seconds (at least
        one); for each applied, whether it changed something (False: a duplicate). Raises if any of them
        fails, and then nothing of the batch was kept."""
        started = time.monotonic()
        with Session(self.engine, expire_on_commit=False) as session:
            # A handler that rolls the session back (one shared with an API path may) drops the work of
            # the messages before it: then the batch fails and its messages are applied one at a time.
            # (A savepoint a handler rolls back, as the insurance upsert does, keeps the rest: not counted.)
            rollbacks = _watch_rollbacks(session)
            _refuse_handler_commits(session)
            claimed = self._claim(session, events)
            applied: list[bool] = []
            try:
                for index, message in enumerate(events):
                    if applied and budget is not None and time.monotonic() - started > budget:
                        break
                    if message.id not in claimed:  # applied before, or earlier in this batch
                        applied.append(False)
                        continue
                    claimed.discard(message.id)
                    structlog.contextvars.bind_contextvars(
                        message_id=message.id,
                        queue=self.queue,
                        case_id=message.subject,
                        event_type=message.type,
                    )
                    with self.message_span(message, headers[index] if headers else None) as span:
                        span.set_attribute("messaging.batch.message_count", len(events))
                        with _handling(session):
                            self.handle(session, message)
                    if rollbacks:
                        raise BatchBroken(f"the handler of {message.type} rolled the transaction back")
                    applied.append(True)
            finally:
                structlog.contextvars.unbind_contextvars("message_id", "queue", "case_id", "event_type")
            left = [message.id for message in events[len(applied) :] if message.id in claimed]
            if left:  # past the budget: the next batch claims and applies them
                session.execute(delete(Inbox).where(col(Inbox.message_id).in_(left)))
            self.last_written = frozenset(session.info.get(ADDED, ()))
            session.commit()
        crash_point("consumer.after_commit_before_ack")
        return applied

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        # Collected here, applied by `after_dispatch` once this round of deliveries is in.
        self._pending.append((channel, method, props, body))

    def after_dispatch(self, channel: BlockingChannel) -> None:
        # Deliveries of a channel that has since closed are left to the broker, which redelivers them.
        waiting = [(m, p, b) for ch, m, p, b in self._pending if ch is channel and channel.is_open]
        self._pending = []
        while len(waiting) > 1:
            waiting = self._process_batch(channel, waiting)
        if waiting:
            self._process_one(channel, *waiting[0])

    def _process_batch(self, channel: BlockingChannel, batch: list[Delivery]) -> list[Delivery]:
        """Apply the first messages of `batch` that fit in `batch_seconds`; returns the ones left over."""
        try:
            events = [decode_envelope(body, props.content_type) for _, props, body in batch]
            applied = self.apply_batch(events, [props.headers for _, props, _ in batch], self.batch_seconds)
        except Exception as exc:
            # Nothing of the batch was kept: apply its messages one at a time, as if they came alone.
            log.info("batch.applied_one_by_one", queue=self.queue, size=len(batch), error=type(exc).__name__)
            for delivery in batch:
                self._process_one(channel, *delivery)
            return []
        channel.basic_ack(batch[len(applied) - 1][0].delivery_tag, multiple=True)
        for applied_event, changed in zip(events, applied, strict=False):
            log.info(
                "message.applied" if changed else "message.duplicate_dropped",
                message_id=applied_event.id,
                queue=self.queue,
                case_id=applied_event.subject,
                event_type=applied_event.type,
                batch=len(applied),
            )
        if any(applied):
            self.after_ack()
        return batch[len(applied) :]

    def after_ack(self) -> None:
        if self.on_commit:
            self.on_commit()


class OutboxRelay:
    """Publishes committed outbox rows in order and marks them; at-least-once, ids make it idempotent."""

    def __init__(self, *, settings: Settings, engine: Engine, interval: float = 0.5) -> None:
        self.settings = settings
        self.engine = engine
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._publisher = Publisher(settings)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                while self.drain():
                    pass
            except Exception as exc:
                log.warning("outbox.relay_failed", error=type(exc).__name__, detail=str(exc)[:200])
                self._publisher.close()
                self._stop.wait(1)
            self._wake.wait(self.interval)
            self._wake.clear()
        self._publisher.close()

    def drain(self, batch: int = 100) -> int:
        """Publish up to `batch` pending rows; returns how many were published."""
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.exec(
                select(Outbox)
                .where(Outbox.published_at.is_(None))  # type: ignore[union-attr]
                .order_by(Outbox.id)  # type: ignore[arg-type]
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                self._publisher.publish_raw(
                    row.exchange,
                    row.routing_key,
                    row.body,
                    row.message_id,
                    headers=trace_headers_of(row.body),
                )
                crash_point("outbox.after_publish_before_mark")
                row.published_at = datetime.now(UTC)
                session.add(row)
            session.commit()
            return len(rows)
