"""A FHIR update of a partner's Subscription (`PUT [base]/Subscription/{id}`): what the new version changes on
the subscription and on its channel, in the caller's transaction with the subscription's row locked.

What may change: the filter, the payload content, the heartbeat period, the channel's endpoint and headers, and
`status`: `off` turns it off as DELETE does; `requested` turns an `off` or `error` one back on. The topic may not
(a new Subscription is created for another topic). A changed endpoint or headers, or turning it back on, queues a
new handshake to the channel as it is now, ahead of the notifications still pending; those then go to the new
endpoint too, after it, with their attempts counted afresh: a receiver that moved gets what was not delivered yet,
in order, where it is now. `events_since_start` runs on across updates.

    UpdateRefused    (409 turning it back on would pass the partner's limit; 422 the topic changed, or `active`
                      or `error` sent for one that is off)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from services.intake import fhir_subscriptions as subs
from services.intake.fhir_intake import FhirInvalid, Issue
from services.intake.models import FhirSubscription, WebhookDelivery, WebhookEndpoint

# What an update may carry in `status`: `requested` and `off` ask for it on or off; `active` and `error` are the
# server's, sent back as a read showed them (fhirpy's save(), an interface engine's read-modify-write).
UPDATE_STATUSES = ("requested", "off", "active", "error")
HANDSHAKE_TYPE = "subscription.handshake"


class UpdateRefused(Exception):
    """The update asks for what cannot be done: its HTTP status, issue code and issues (element, what to do)."""

    def __init__(self, status: int, code: str, issues: list[tuple[str | None, str]]) -> None:
        super().__init__(issues[0][1])
        self.status, self.code, self.issues = status, code, issues


def pending_deliveries(session: Session, subscription_id: str) -> list[WebhookDelivery]:
    """The channel's deliveries not sent yet, locked (before the endpoint's row is written: the sender locks
    deliveries, then the endpoint it disables on a 410)."""
    return list(
        session.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == subscription_id, WebhookDelivery.status == "pending")
            .order_by(col(WebhookDelivery.id))
            .with_for_update()
        ).all()
    )


def turn_off(session: Session, subscription: FhirSubscription, endpoint: WebhookEndpoint,
             pending: list[WebhookDelivery], reason: str) -> None:  # fmt: skip
    """Nothing more is queued or sent: the notifications not delivered yet are cancelled."""
    for delivery in pending:
        delivery.status = "cancelled"
        session.add(delivery)
    subscription.status = "off"
    endpoint.disabled_at = endpoint.disabled_at or datetime.now(UTC)
    endpoint.disabled_reason = reason
    session.add(subscription)
    session.add(endpoint)


def unmask(wanted: subs.SubscriptionRequest, document: dict[str, Any],
           kept: list[tuple[str, str]]) -> dict[str, Any]:  # fmt: skip
    """The document with each `channel.header` sent back as read (`Name: (not shown)`) given the value kept for
    that name (a read never shows them); FhirInvalid if none is kept for it. `wanted.headers` likewise."""
    values = {name.lower(): value for name, value in kept}
    issues: list[Issue] = []
    headers: list[tuple[str, str]] = []
    for n, (name, value) in enumerate(wanted.headers):
        if value == subs.MASKED:
            if name.lower() not in values:
                issues.append(Issue(f"Subscription.channel.header[{n}]",
                                    f"{name} is sent masked as a read shows it, and none is kept to keep: send "
                                    "its value"))  # fmt: skip
            value = values.get(name.lower(), value)
        headers.append((name, value))
    if issues:
        raise FhirInvalid(issues)
    wanted.headers = headers
    if not headers:
        return document
    return {**document, "channel": {**document["channel"], "header": [f"{n}: {v}" for n, v in headers]}}


def apply_update(session: Session, base: str, subscription: FhirSubscription, endpoint: WebhookEndpoint,
                 wanted: subs.SubscriptionRequest, document: dict[str, Any], most_on: int) -> bool:  # fmt: skip
    """Make `subscription` what `document` (read as `wanted`) says; whether anything changed (a new version).
    `most_on`: the Subscriptions a partner may have on (turning one back on counts). UpdateRefused, or
    FhirInvalid for a header sent masked with none kept."""
    if wanted.topic != subscription.topic:
        raise UpdateRefused(422, "invalid", [("Subscription.criteria",
                                              "the topic of a Subscription cannot change: create a new "
                                              "Subscription to the other topic (POST [base]/Subscription), and "
                                              "DELETE this one if you no longer want it")])  # fmt: skip
    document = unmask(wanted, document, [(n, v) for n, v in json.loads(endpoint.channel_headers)])
    asked = document["status"]
    now_status, _ = subs.current_status(session, subscription, endpoint)
    if now_status == "off" and asked in ("active", "error"):
        raise UpdateRefused(422, "invalid", [("Subscription.status",
                                              "the Subscription is off: send status `requested` to turn it back "
                                              "on, or `off` to change it and leave it off")])  # fmt: skip
    turning_off = asked == "off" and now_status != "off"
    turning_on = asked == "requested" and now_status in ("off", "error")
    kept = {k: v for k, v in document.items() if k not in ("id", "meta", "status", "error")}
    if not (turning_off or turning_on or kept != json.loads(subscription.resource_json)):
        return False
    if turning_on and subscription.status == "off":
        on = session.exec(
            select(FhirSubscription.id).where(
                FhirSubscription.partner_id == subscription.partner_id, FhirSubscription.status != "off"
            )
        ).all()
        if len(on) >= most_on:
            raise UpdateRefused(409, "conflict", [(None, f"you already have {most_on} Subscriptions on, the most "
                                                         "you may have; DELETE one you no longer use (GET "
                                                         "[base]/Subscription lists them), then try again")])  # fmt: skip
    channel_changed = wanted.url != endpoint.url or [list(h) for h in wanted.headers] != json.loads(
        endpoint.channel_headers
    )
    pending = pending_deliveries(session, subscription.id)
    subscription.version_id += 1
    subscription.updated_at = datetime.now(UTC)
    subscription.task_statuses = ",".join(wanted.task_statuses)
    subscription.payload_content = wanted.payload_content
    subscription.heartbeat_seconds = wanted.heartbeat_seconds
    subscription.resource_json = json.dumps(kept)
    endpoint.url = wanted.url
    endpoint.channel_headers = json.dumps(wanted.headers)
    if turning_off:
        turn_off(session, subscription, endpoint, pending, "the Subscription was updated to off")
    elif turning_on or (channel_changed and subscription.status != "off"):
        handshake_again(session, base, subscription, endpoint, pending)
    session.add(subscription)
    session.add(endpoint)
    return True


def handshake_again(session: Session, base: str, subscription: FhirSubscription, endpoint: WebhookEndpoint,
                    pending: list[WebhookDelivery]) -> None:  # fmt: skip
    """Turn the channel on and queue a new handshake to it ahead of the notifications still pending (the sender
    sends a subscription's deliveries in the order queued); those are due at once after it, their attempts
    counted afresh (a backoff earned by the old endpoint would hold the new one's for hours). A handshake still
    pending is superseded (cancelled)."""
    now = datetime.now(UTC)
    waiting: list[datetime] = []
    for delivery in pending:
        if delivery.event_type == HANDSHAKE_TYPE:
            delivery.status = "cancelled"
        else:
            delivery.attempts, delivery.next_attempt_at = 0, now
            created = delivery.created_at
            waiting.append(created if created.tzinfo else created.replace(tzinfo=UTC))
        session.add(delivery)
    subscription.status = "requested"
    subscription.handshake_event = f"{subs.HANDSHAKE}:{subscription.version_id}"
    endpoint.disabled_at, endpoint.disabled_reason = None, ""
    first = min(waiting, default=now)
    subs.handshake(session, base, subscription, min(first - timedelta(milliseconds=1), now))
    subscription.last_queued_at = now  # the heartbeat period runs from now, not from the place it was put
