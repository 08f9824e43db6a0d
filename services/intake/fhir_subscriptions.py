"""FHIR Subscriptions, topic-based, as the Subscriptions R5 Backport IG puts them on R4: what a partner's
Subscription asks for, and the notification Bundles its rest-hook channel is sent.

Two topics are published (SubscriptionTopic canonicals under our FHIR base): `case-status`, the case's Task
changing status (every case status change; `_criteria` `Task?status=…` keeps those whose Task status is one of
the codes), and `report-ready`, the case's report ready (the Task, and the DiagnosticReport's URL).

A Subscription's channel is a WebhookEndpoint of kind `fhir-subscription`: the outbound webhook sender
(services.intake.webhooks_out) sends its notifications, with its lanes, retries, Retry-After, delivery log and
410 handling, one at a time and in the order they were queued. Each notification is queued in the transaction
that applies the case event (no event is lost, none is numbered twice), numbered 1, 2, ... per subscription.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir.resources.R4B.subscription import Subscription
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.envelope import CloudEvent
from services.common.db import insert_new
from services.intake.fhir_intake import FhirInvalid, Issue
from services.intake.fhir_task import to_task
from services.intake.models import Case, FhirSubscription, WebhookDelivery, WebhookEndpoint
from services.intake.webhooks_out import webhook_id

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FILTER_CRITERIA = BACKPORT + "backport-filter-criteria"
PAYLOAD_CONTENT = BACKPORT + "backport-payload-content"
HEARTBEAT_PERIOD = BACKPORT + "backport-heartbeat-period"
TOPIC_CANONICAL = BACKPORT + "capabilitystatement-subscriptiontopic-canonical"
STATUS_PROFILE = BACKPORT + "backport-subscription-status-r4"
NOTIFICATION_PROFILE = BACKPORT + "backport-subscription-notification-r4"
STATUS_OPERATION = (
    "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"
)

# The topics published (the canonical's last segment) and the case event each is raised by.
TOPICS = {"case-status": "case.status_changed", "report-ready": "report.ready"}
PAYLOAD_CONTENTS = ("empty", "id-only", "full-resource")
TASK_STATUSES = ("draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress",
                 "on-hold", "failed", "completed", "entered-in-error")  # fmt: skip
HANDSHAKE = "handshake"  # the source event id of the first handshake (an update's: handshake:{version})
ERROR_AFTER = 2  # failed attempts of one notification after which the subscription shows `error`
# Headers the sender sets itself; a channel.header may not replace them.
RESERVED_HEADERS = {"host", "content-type", "content-length", "transfer-encoding", "connection", "webhook-id",
                    "webhook-timestamp", "webhook-signature"}  # fmt: skip
HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}):[ \t]*([\x20-\x7e]{0,1000})")
MAX_HEARTBEAT = 86400
SUBSCRIBED_READ = "fhir_subscriptions.partners_read"  # session.info: (transaction, partner id -> any on)
MASKED = "(not shown)"  # a channel.header value as read; sent back in an update, it keeps the value kept


def topic_url(base: str, topic: str) -> str:
    return f"{base}/SubscriptionTopic/{topic}"


@dataclass
class SubscriptionRequest:
    """What a posted Subscription asks for, once read."""

    topic: str
    url: str
    task_statuses: list[str] = field(default_factory=list)
    payload_content: str = "id-only"
    heartbeat_seconds: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def _extensions(element: Any, url: str) -> list[dict[str, Any]]:
    found = element.get("extension") if isinstance(element, dict) else None
    return [e for e in found or [] if isinstance(e, dict) and e.get("url") == url]


def read_subscription(
    document: Any, base: str, allowed_statuses: tuple[str, ...] = ("requested",)
) -> SubscriptionRequest:
    """The Subscription as R4B validates it and as we can honour it, its `status` one of `allowed_statuses` (a
    create's is `requested`, an update's may be any); FhirInvalid naming each element otherwise."""
    if not isinstance(document, dict) or document.get("resourceType") != "Subscription":
        raise FhirInvalid([Issue("Subscription.resourceType", "send a FHIR R4 Subscription")])
    try:
        Subscription.model_validate(document)
    except ValidationError as exc:
        raise FhirInvalid(
            [Issue(".".join(["Subscription", *map(str, e["loc"])]), e["msg"]) for e in exc.errors()[:20]]
        ) from exc
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise FhirInvalid([Issue("Subscription", "not a valid FHIR R4 Subscription")]) from exc
    issues: list[Issue] = []
    canonicals = {topic_url(base, t): t for t in TOPICS}
    topic = canonicals.get(document.get("criteria", ""))
    if topic is None:
        issues.append(Issue("Subscription.criteria", "name a topic we publish: " + " or ".join(canonicals)))
    if document.get("status") not in allowed_statuses:
        issues.append(
            Issue("Subscription.status", "a new Subscription is sent with status `requested`")
            if allowed_statuses == ("requested",)
            else Issue(
                "Subscription.status", "status is `requested` (on), `off`, or as read (`active`, `error`)"
            )
        )
    statuses: list[str] = []
    for n, criterion in enumerate(_extensions(document.get("_criteria"), FILTER_CRITERIA)):
        where = f"Subscription.criteria.extension[{n}]"
        match = re.fullmatch(r"Task\?status=([a-z,-]+)", str(criterion.get("valueString", "")))
        codes = match.group(1).split(",") if match else []
        if not codes or any(code not in TASK_STATUSES for code in codes):
            issues.append(Issue(where, "the filter supported is Task?status=code[,code] (Task status codes)"))
        statuses = [c for c in codes if not statuses or c in statuses]  # several filters: all must hold
    channel = document.get("channel") or {}
    if channel.get("type") != "rest-hook":
        issues.append(Issue("Subscription.channel.type", "the channel supported is rest-hook"))
    url = channel.get("endpoint")
    if not url:
        issues.append(
            Issue("Subscription.channel.endpoint", "send the https URL notifications are POSTed to")
        )
    if channel.get("payload") != "application/fhir+json":
        issues.append(
            Issue("Subscription.channel.payload", "notifications are sent as application/fhir+json")
        )
    content = "id-only"
    for extension in _extensions(channel.get("_payload"), PAYLOAD_CONTENT):
        content = str(extension.get("valueCode"))
        if content not in PAYLOAD_CONTENTS:
            issues.append(Issue("Subscription.channel.payload.extension",
                                "backport-payload-content is one of " + ", ".join(PAYLOAD_CONTENTS)))  # fmt: skip
    heartbeat: int | None = None
    for extension in _extensions(channel, HEARTBEAT_PERIOD):
        value = extension.get("valueUnsignedInt")
        if not isinstance(value, int) or not 1 <= value <= MAX_HEARTBEAT:
            issues.append(Issue("Subscription.channel.extension",
                                f"backport-heartbeat-period is seconds from 1 to {MAX_HEARTBEAT}"))  # fmt: skip
        else:
            heartbeat = value
    headers: list[tuple[str, str]] = []
    for n, line in enumerate(channel.get("header") or []):
        match = HEADER.fullmatch(line) if isinstance(line, str) else None
        if match is None or match.group(1).lower() in RESERVED_HEADERS:
            issues.append(Issue(f"Subscription.channel.header[{n}]",
                                "a header is `Name: value` (printable ASCII), not one the sender sets itself "
                                "(Content-Type, Host, webhook-*)"))  # fmt: skip
        else:
            headers.append((match.group(1), match.group(2).strip()))
    if issues:
        raise FhirInvalid(issues)
    assert topic is not None and isinstance(url, str)
    return SubscriptionRequest(topic, url, statuses, content, heartbeat, headers)


def new_subscription(
    partner_id: str, request: SubscriptionRequest, document: dict[str, Any]
) -> tuple[WebhookEndpoint, FhirSubscription]:
    subscription_id = str(uuid.uuid4())
    endpoint = WebhookEndpoint(
        id=subscription_id,
        partner_id=partner_id,
        url=request.url,
        description="FHIR Subscription",
        kind="fhir-subscription",
        channel_headers=json.dumps(request.headers),
    )
    kept = {k: v for k, v in document.items() if k not in ("id", "meta", "status", "error")}
    subscription = FhirSubscription(
        id=subscription_id,
        partner_id=partner_id,
        topic=request.topic,
        task_statuses=",".join(request.task_statuses),
        payload_content=request.payload_content,
        heartbeat_seconds=request.heartbeat_seconds,
        resource_json=json.dumps(kept),
    )
    return endpoint, subscription


def queue(session: Session, subscription: FhirSubscription, source_event_id: str, case_id: str,
          bundle: dict[str, Any], at: datetime) -> None:  # fmt: skip
    """Queue a notification for the subscription's channel (in the caller's transaction)."""
    subscription.last_queued_at = at
    session.add(subscription)
    insert_new(
        session,
        [
            WebhookDelivery(
                id=webhook_id(subscription.id, source_event_id),
                endpoint_id=subscription.id,
                source_event_id=source_event_id,
                event_type=f"subscription.{bundle_type(bundle)}",
                case_id=case_id,
                payload=json.dumps(bundle),
                created_at=at,
                next_attempt_at=at,
            )
        ],
    )


def bundle_type(bundle: dict[str, Any]) -> str:
    status = bundle["entry"][0]["resource"]
    return next(p["valueCode"] for p in status["parameter"] if p["name"] == "type")


def handshake(
    session: Session, base: str, subscription: FhirSubscription, at: datetime | None = None
) -> None:
    """Queue the handshake `subscription.handshake_event` names, `at` in the channel's order (now unless
    given: an update's is put before the notifications still pending)."""
    now = datetime.now(UTC)
    bundle = notification(base, subscription, "handshake", now)
    queue(session, subscription, subscription.handshake_event, "", bundle, at or now)


def notify(session: Session, event: CloudEvent, base: str) -> int:
    """Queue an event-notification for each of the case's partner's subscriptions to the topic `event` raises
    whose filter the case's Task passes (in the consumer's transaction); the number queued. An event applied
    again queues nothing and numbers nothing."""
    topic = next((t for t, raised_by in TOPICS.items() if raised_by == event.type), None)
    case = session.get(Case, event.subject) if topic else None
    if case is None or not subscribed(session, case.partner_id):
        return 0
    subscriptions = session.exec(
        select(FhirSubscription)
        .join(WebhookEndpoint, col(WebhookEndpoint.id) == FhirSubscription.id)
        .where(
            FhirSubscription.partner_id == case.partner_id,
            FhirSubscription.topic == topic,
            FhirSubscription.status != "off",
            col(WebhookEndpoint.disabled_at).is_(None),
        )
        .order_by(col(FhirSubscription.id))
        .with_for_update(of=FhirSubscription)  # numbered one event at a time
    ).all()
    task = to_task(case) if subscriptions else {}
    queued = 0
    for subscription in subscriptions:
        wanted = [s for s in subscription.task_statuses.split(",") if s]
        if wanted and task["status"] not in wanted:
            continue
        if session.get(WebhookDelivery, webhook_id(subscription.id, event.id)) is not None:
            continue
        subscription.events_since_start += 1
        now = datetime.now(UTC)
        report = str(event.data.get("fhir_url") or "") if topic == "report-ready" else None
        bundle = notification(base, subscription, "event-notification", now, task, report or None)
        queue(session, subscription, event.id, case.id, bundle, now)
        queued += 1
    return queued


def subscribed(session: Session, partner_id: str) -> bool:
    """Whether the partner has a Subscription on, read once per transaction (a consumer batch applies many
    events of the same partners, most of which have none)."""
    transaction = session.get_transaction()
    read = session.info.get(SUBSCRIBED_READ)
    if read is None or read[0] is not transaction:
        read = session.info[SUBSCRIBED_READ] = (transaction, {})
    known: dict[str, bool] = read[1]
    if partner_id not in known:
        known[partner_id] = (
            session.exec(
                select(FhirSubscription.id)
                .where(FhirSubscription.partner_id == partner_id, FhirSubscription.status != "off")
                .limit(1)
            ).first()
            is not None
        )
    return known[partner_id]


def queue_heartbeats(engine: Engine, base: str, now: datetime | None = None) -> int:
    """Queue a heartbeat for each subscription with a heartbeat period that had nothing queued within it."""
    now = now or datetime.now(UTC)
    queued = 0
    with Session(engine) as session:
        due = session.exec(
            select(FhirSubscription)
            .join(WebhookEndpoint, col(WebhookEndpoint.id) == FhirSubscription.id)
            .where(
                col(FhirSubscription.heartbeat_seconds).is_not(None),
                FhirSubscription.status != "off",
                col(WebhookEndpoint.disabled_at).is_(None),
            )
            .with_for_update(of=FhirSubscription, skip_locked=True)
        ).all()
        for subscription in due:
            last = subscription.last_queued_at
            last = last if last.tzinfo else last.replace(tzinfo=UTC)
            if now - last < timedelta(seconds=subscription.heartbeat_seconds or 0):
                continue
            at = datetime.now(UTC)  # `now` decides what is due (tests look ahead); the queue is in real time
            bundle = notification(base, subscription, "heartbeat", at)
            queue(session, subscription, f"heartbeat:{at.isoformat()}", "", bundle, at)
            queued += 1
        session.commit()
    return queued


def notification(base: str, subscription: FhirSubscription, kind: str, at: datetime,
                 task: dict[str, Any] | None = None, report_url: str | None = None) -> dict[str, Any]:  # fmt: skip
    """A notification Bundle (backport-subscription-notification-r4): a `history` Bundle whose first entry is
    the SubscriptionStatus (a Parameters, backport-subscription-status-r4), then, for an event, the focus (the
    Task: its URL with id-only, the Task too with full-resource) and, for report-ready, the report's URL."""
    content = subscription.payload_content
    event: list[dict[str, Any]] = []
    if kind == "event-notification":
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(subscription.events_since_start)},
            {"name": "timestamp", "valueInstant": at.isoformat()},
        ]
        if task is not None and content != "empty":
            parts.append({"name": "focus", "valueReference": {"reference": f"{base}/Task/{task['id']}"}})
            if report_url:
                parts.append({"name": "additional-context", "valueReference": {"reference": report_url}})
        event = [{"name": "notification-event", "part": parts}]
    status = status_parameters(base, subscription, kind, "active" if kind != "handshake" else "requested")
    status["parameter"] += event
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": status,
            "request": {"method": "GET", "url": f"{base}/Subscription/{subscription.id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if kind == "event-notification" and task is not None and content != "empty":
        entries.append(
            {
                "fullUrl": f"{base}/Task/{task['id']}",
                **({"resource": task} if content == "full-resource" else {}),
                "request": {"method": "PUT", "url": f"Task/{task['id']}"},
                "response": {"status": "200"},
            }
        )
        if report_url:
            entries.append(
                {
                    "fullUrl": report_url,
                    "request": {"method": "GET", "url": report_url},
                    "response": {"status": "200"},
                }
            )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": at.isoformat(),
        "entry": entries,
    }


def status_parameters(base: str, subscription: FhirSubscription, kind: str, status: str,
                      error: str | None = None) -> dict[str, Any]:  # fmt: skip
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{subscription.id}"}},
        {"name": "topic", "valueCanonical": topic_url(base, subscription.topic)},
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(subscription.events_since_start)},
    ]
    if error:
        parameters.append({"name": "error", "valueCodeableConcept": {"text": error}})
    return {"resourceType": "Parameters", "id": str(uuid.uuid4()), "meta": {"profile": [STATUS_PROFILE]},
            "parameter": parameters}  # fmt: skip


def current_status(
    session: Session, subscription: FhirSubscription, endpoint: WebhookEndpoint
) -> tuple[str, str]:
    """The subscription's status and, when `error`, why: `off` once deleted; `requested` until the handshake
    is answered 2xx, then `active`; `error` while the handshake or a notification keeps failing (ERROR_AFTER
    attempts) or after the channel answered 410 (it gets nothing more)."""
    if subscription.status == "off":
        return "off", ""
    if endpoint.disabled_at is not None:
        return "error", endpoint.disabled_reason
    shake = session.get(WebhookDelivery, webhook_id(subscription.id, subscription.handshake_event))
    if shake is None or (shake.status == "pending" and shake.attempts == 0):
        return "requested", ""
    if shake.status != "delivered":
        return "error", "the handshake was not answered 2xx: " + why(shake)
    failing = session.exec(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == subscription.id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts >= ERROR_AFTER,
        )
        .order_by(col(WebhookDelivery.created_at))
        .limit(1)
    ).first()
    if failing is not None:
        return "error", f"a notification is not delivered after {failing.attempts} attempts: " + why(failing)
    return "active", ""


def why(delivery: WebhookDelivery) -> str:
    if delivery.last_error:
        return delivery.last_error
    if delivery.last_status_code is not None:
        return f"the endpoint answered {delivery.last_status_code}"
    return "no answer yet"


def as_resource(base: str, subscription: FhirSubscription, status: str, error: str) -> dict[str, Any]:
    """The Subscription as kept, with its status now; channel.header values are not shown (they are the
    receiver's credentials)."""
    resource: dict[str, Any] = json.loads(subscription.resource_json)
    channel = resource.get("channel") or {}
    if channel.get("header"):
        channel["header"] = [f"{line.split(':', 1)[0]}: {MASKED}" for line in channel["header"]]
    changed = subscription.updated_at or subscription.created_at
    changed = changed if changed.tzinfo else changed.replace(tzinfo=UTC)
    resource.update(
        {
            "resourceType": "Subscription",
            "id": subscription.id,
            "meta": {"versionId": str(subscription.version_id), "lastUpdated": changed.isoformat()},
            "status": status,
        }
    )
    if error:
        resource["error"] = error[:500]
    return resource
