"""Dead letters: inspect, re-publish and purge what a consumer could not apply.

A message reaches `<queue>.dlq` in two ways (services/common/amqp.py):
- a `PoisonMessage` (malformed, unknown type): dead-lettered at once, headers `x-poison-reason`,
  `x-original-exchange`, `x-original-routing-key`;
- a handler that kept failing: the quorum queue dead-letters it after `x-delivery-limit` deliveries,
  header `x-death` (reason `delivery_limit`, the original exchange and routing keys).

Reading never changes the queue: messages are fetched unacknowledged and returned when the channel
closes. Replay re-publishes to the original exchange and routing key with publisher confirms and
`mandatory`, and removes the dead letter only after the broker confirmed the copy; consumers' inboxes drop
it where it was already applied. Nothing here prints a message's `data` (it may carry PHI): of an envelope
only its context attributes, and the names of its other keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from services.common.amqp import QUEUES, connect, dead_letter_queue
from services.common.config import Settings

__all__ = [
    "DeadLetter",
    "DeadLetterError",
    "dead_letters",
    "purge",
    "replay",
    "show",
]

# Headers that describe the dead-lettering, dropped from a replayed copy.
DEAD_LETTER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
    "x-poison-reason",
    "x-original-exchange",
    "x-original-routing-key",
)


# What `show` prints of an envelope: the CloudEvents context attributes, never `data` or anything else.
CONTEXT_ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "traceparent",
    "tracestate",
)


class DeadLetterError(Exception):
    """An operator's request that cannot be carried out as asked (unknown queue or id, unroutable)."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as operations see it: never its `data`."""

    id: str
    type: str
    reason: str
    count: int
    first_seen: str | None
    exchange: str
    routing_key: str

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "reason": self.reason,
            "count": self.count,
            "first_seen": self.first_seen,
        }


@dataclass(frozen=True)
class _Fetched:
    tag: int
    props: BasicProperties
    body: bytes
    letter: DeadLetter


def resolve_queue(queue: str) -> str:
    """`insurance` or `insurance.dlq` -> `insurance.dlq`; anything else is refused with the choices."""
    name = queue.removesuffix(".dlq")
    if name not in QUEUES:
        raise DeadLetterError(f"no queue {queue!r}; dead-letter queues exist for {', '.join(sorted(QUEUES))}")
    return dead_letter_queue(name)


def _message_id(props: BasicProperties, body: bytes) -> str:
    if props.message_id:
        return str(props.message_id)
    return "body-" + hashlib.sha256(body).hexdigest()[:16]  # a malformed message may carry no id


def _envelope(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _time(value: Any) -> str | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, int) and value > 0:
        return datetime.fromtimestamp(value, UTC).isoformat()
    return None


def _deaths(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """The broker's `x-death` tables. A poison message keeps the headers it was published with, so this one
    may be anything a publisher wrote: what is not a list of tables is not a death."""
    deaths = headers.get("x-death")
    return [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []


def _count(death: dict[str, Any]) -> int:
    count = death.get("count", 1)
    return count if isinstance(count, int) else 1


def describe(props: BasicProperties, body: bytes, queue: str) -> DeadLetter:
    headers = props.headers or {}
    deaths = _deaths(headers)
    death = deaths[-1] if deaths else {}  # the oldest death is last
    envelope = _envelope(body) or {}
    if "x-poison-reason" in headers:
        reason = "poison: " + _text(headers["x-poison-reason"])
        exchange = _text(headers.get("x-original-exchange", ""))
        routing_key = _text(headers.get("x-original-routing-key", ""))
    elif death:
        reason = _text(death.get("reason", "dead-lettered"))
        exchange = _text(death.get("exchange", ""))
        keys = death.get("routing-keys") or [""]
        routing_key = _text(keys[0] if isinstance(keys, list) else keys)
    else:
        reason, exchange, routing_key = "unknown (no x-death or x-poison-reason header)", "", ""
    if reason == "delivery_limit":
        reason = f"delivery_limit: the {queue.removesuffix('.dlq')} handler failed on every delivery"
    first_seen = _time(death.get("time")) or _time(props.timestamp) or envelope.get("time")
    return DeadLetter(
        id=_message_id(props, body),
        type=_text(props.type or envelope.get("type") or "unknown"),
        reason=reason,
        count=sum(_count(d) for d in deaths) or 1,
        first_seen=str(first_seen) if first_seen else None,
        exchange=exchange,
        routing_key=routing_key,
    )


@contextmanager
def _fetch_all(settings: Settings, queue: str) -> Iterator[tuple[BlockingChannel, list[_Fetched]]]:
    """Every message of the dead-letter queue, fetched unacknowledged; unacked ones return on close."""
    dlq = resolve_queue(queue)
    conn = connect(settings)
    try:
        channel = conn.channel()
        try:
            depth = channel.queue_declare(dlq, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise DeadLetterError(
                f"{dlq} does not exist on this broker yet (no service has started)"
            ) from exc
        fetched: list[_Fetched] = []
        for _ in range(depth):
            method, props, body = channel.basic_get(dlq, auto_ack=False)
            if method is None:
                break
            assert isinstance(method, Basic.GetOk)
            fetched.append(_Fetched(method.delivery_tag, props, body, describe(props, body, dlq)))
        yield channel, fetched
    finally:
        if conn.is_open:
            conn.close()


def dead_letters(settings: Settings, queue: str) -> list[DeadLetter]:
    with _fetch_all(settings, queue) as (_, fetched):
        return [f.letter for f in fetched]


def show(settings: Settings, queue: str, message_id: str) -> dict[str, Any]:
    """Headers and the envelope without `data`."""
    with _fetch_all(settings, queue) as (_, fetched):
        found = _find(fetched, message_id, queue)[0]
    envelope = _envelope(found.body)
    headers = {k: _jsonable(v) for k, v in (found.props.headers or {}).items()}
    return {
        **found.letter.summary(),
        "original_exchange": found.letter.exchange,
        "original_routing_key": found.letter.routing_key,
        "properties": {
            "message_id": found.props.message_id,
            "type": found.props.type,
            "content_type": found.props.content_type,
        },
        "headers": headers,
        "envelope": (
            _context(envelope) if envelope is not None else f"not a JSON object ({len(found.body)} bytes)"
        ),
    }


def _context(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope's CloudEvents context attributes (scalars only) and the names of its other keys: a body
    that is a command's data without an envelope (or a binary-mode CloudEvent) must not print its PHI."""
    shown: dict[str, Any] = {
        k: envelope[k]
        if isinstance(envelope[k], str | int | float | bool)
        else f"<{type(envelope[k]).__name__}>"
        for k in CONTEXT_ATTRIBUTES
        if k in envelope
    }
    others = sorted(k for k in envelope if k not in CONTEXT_ATTRIBUTES and k != "data")
    if others:
        shown["other keys"] = others
    return shown


def replay(settings: Settings, queue: str, ids: list[str] | None) -> list[str]:
    """Re-publish the dead letters with these ids (all when None); returns the ids replayed."""
    with _fetch_all(settings, queue) as (channel, fetched):
        chosen = fetched if ids is None else [f for id_ in ids for f in _find(fetched, id_, queue)]
        publisher = channel.connection.channel()
        publisher.confirm_delivery()
        replayed = []
        for item in chosen:
            if not item.letter.exchange and not item.letter.routing_key:
                raise DeadLetterError(f"{item.letter.id} names no original exchange or routing key")
            headers = {k: v for k, v in (item.props.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
            props = BasicProperties(
                message_id=item.props.message_id,
                content_type=item.props.content_type,
                delivery_mode=pika.DeliveryMode.Persistent,
                type=item.props.type,
                timestamp=item.props.timestamp,
                headers=headers,
            )
            try:
                publisher.basic_publish(
                    item.letter.exchange, item.letter.routing_key, item.body, props, mandatory=True
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise DeadLetterError(
                    f"{item.letter.id} was not accepted by {item.letter.exchange or 'the default exchange'}"
                    f" / {item.letter.routing_key}; it stays in the dead-letter queue"
                ) from exc
            channel.basic_ack(item.tag)  # only after the broker confirmed the copy
            replayed.append(item.letter.id)
        return replayed


def purge(settings: Settings, queue: str, message_id: str) -> str:
    """Drop one dead letter for good."""
    with _fetch_all(settings, queue) as (channel, fetched):
        for item in _find(fetched, message_id, queue):
            channel.basic_ack(item.tag)
    return message_id


def _find(fetched: list[_Fetched], message_id: str, queue: str) -> list[_Fetched]:
    found = [f for f in fetched if f.letter.id == message_id]
    if not found:
        raise DeadLetterError(
            f"no dead letter {message_id!r} in {resolve_queue(queue)}; "
            f"`secondopinion dlq list {queue}` shows the ids"
        )
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
