"""A partner's webhook endpoints, their delivery log, and manual replay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from sqlmodel import Session, col, select

from services.auth import Caller, Principal
from services.auth.problems import problem_response
from services.common.config import get_settings
from services.common.db import transaction_lock
from services.intake.api import ERRORS, EngineDep, IdempotencyKey, idempotent
from services.intake.models import (
    AttemptPublic,
    DeliveryPublic,
    EndpointCreate,
    EndpointPublic,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from services.intake.partner_scope import partner_scope
from services.intake.webhooks_out import LEASE, WEBHOOK, EndpointRefused, check_url

ENDPOINT_LOCKS = 0x5EC0_E4D0  # advisory lock key space: one partner's endpoint registrations take turns

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: problem_response(
        404, "No such partner, endpoint or delivery visible to this key", "no webhook endpoint …"
    ),
    409: problem_response(
        409,
        "The URL is already registered, the partner has as many enabled endpoints as it may, "
        "or (replay) the endpoint is disabled",
        "this URL is already registered as endpoint …; use it",
    ),
}


def public(endpoint: WebhookEndpoint) -> EndpointPublic:
    return EndpointPublic(
        endpoint_id=endpoint.id,
        partner_id=endpoint.partner_id,
        url=endpoint.url,
        description=endpoint.description,
        enabled=endpoint.disabled_at is None,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
    )


router = APIRouter(
    prefix="/v1/partners/{partner_id}/webhook-endpoints",
    tags=["webhook endpoints"],
    dependencies=[Depends(partner_scope("webhook-endpoint", "webhook endpoints"))],
)


def endpoint_of(session: Session, caller: Principal, partner_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.partner_id != partner_id or endpoint.kind != WEBHOOK:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, "no webhook endpoint with this id; GET the partner's webhook-endpoints"
        )
    return endpoint


@router.post("", status_code=201, response_model=EndpointPublic, responses=RESPONSES)
async def register(
    partner_id: str,
    body: EndpointCreate,
    request: Request,
    caller: Caller,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Register an endpoint for `case.status_changed`, `records.needed`, `report.ready` and `report.amended`.
    HTTPS to a public address is required (plain HTTP to loopback only in development). Events are signed
    with the partner's webhook secret per Standard Webhooks. A partner has at most 10 enabled endpoints
    (WEBHOOK_ENDPOINTS_PER_PARTNER); one more is a 409 until one is deleted."""
    try:
        # On a thread: the host's DNS lookup (up to DNS_TIMEOUT) must not hold the event loop.
        await asyncio.to_thread(check_url, body.url, get_settings().env)
    except EndpointRefused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    async def create() -> EndpointPublic:
        endpoint = WebhookEndpoint(
            id=str(uuid.uuid4()), partner_id=partner_id, url=body.url, description=body.description
        )
        with Session(engine, expire_on_commit=False) as session:
            refuse_registered(session, partner_id, body.url)
            session.add(endpoint)
            session.commit()
        return public(endpoint)

    return await idempotent(request, caller, engine, idempotency_key, 201, create)


def refuse_registered(session: Session, partner_id: str, url: str, but: str | None = None) -> None:
    """Each endpoint gets its own `webhook-id` for an event: a URL enabled twice would receive every event
    twice under two ids, which no receiver can dedupe. (A disabled endpoint's URL may be registered anew.)
    Each enabled endpoint costs the sender a lane and an attempt per event: a partner has at most
    WEBHOOK_ENDPOINTS_PER_PARTNER of them enabled. Registrations and enables of one partner's endpoints take
    turns (a lock until the caller's commit), so two at once cannot both find the URL free, or a place left."""
    transaction_lock(session, ENDPOINT_LOCKS, partner_id)  # on SQLite (one process on a laptop) not guarded
    enabled = session.exec(
        select(WebhookEndpoint).where(
            WebhookEndpoint.partner_id == partner_id,
            col(WebhookEndpoint.disabled_at).is_(None),
            WebhookEndpoint.kind == WEBHOOK,
        )
    ).all()
    for endpoint in enabled:
        if endpoint.id != but and same_url(endpoint.url, url):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"this URL is already registered as endpoint {endpoint.id}, which is enabled; "
                "use it, or DELETE it first",
            )
    most = get_settings().webhook_endpoints_per_partner
    if len([e for e in enabled if e.id != but]) >= most:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"the partner already has {most} enabled webhook endpoints, the most it may have; DELETE one it "
            "no longer uses (GET the partner's webhook-endpoints lists them), then try again",
        )


def same_url(registered: str, url: str) -> bool:
    """The same target: scheme and host in any case, a default port written out or not."""
    try:
        return target(registered) == target(url)
    except httpx.InvalidURL:
        return registered == url


def target(url: str) -> tuple[str, bytes, int | None, bytes]:
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, parsed.raw_host, port, parsed.raw_path


@router.get("", response_model=list[EndpointPublic], responses=RESPONSES)
def list_endpoints(partner_id: str, caller: Caller, engine: EngineDep) -> list[EndpointPublic]:
    with Session(engine) as session:
        rows = session.exec(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.partner_id == partner_id, WebhookEndpoint.kind == WEBHOOK)
            .order_by(col(WebhookEndpoint.created_at))
        ).all()
    return [public(e) for e in rows]


@router.delete("/{endpoint_id}", status_code=204, responses=RESPONSES)
def disable(partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep) -> Response:
    """Stop sending to this endpoint (its delivery log is kept)."""
    with Session(engine) as session:
        endpoint = endpoint_of(session, caller, partner_id, endpoint_id)
        if endpoint.disabled_at is None:
            endpoint.disabled_at = datetime.now(UTC)
            endpoint.disabled_reason = "disabled by the partner"
            session.add(endpoint)
            session.commit()
    return Response(status_code=204)


@router.post("/{endpoint_id}/enable", response_model=EndpointPublic, responses=RESPONSES)
def enable(partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep) -> EndpointPublic:
    """Send to this endpoint again (e.g. after it was disabled on a 410); pending deliveries resume."""
    with Session(engine, expire_on_commit=False) as session:
        endpoint = endpoint_of(session, caller, partner_id, endpoint_id)
        refuse_registered(session, partner_id, endpoint.url, but=endpoint.id)
        endpoint.disabled_at = None
        endpoint.disabled_reason = ""
        session.add(endpoint)
        session.commit()
    return public(endpoint)


@router.get("/{endpoint_id}/deliveries", response_model=list[DeliveryPublic], responses=RESPONSES)
def deliveries(
    partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep, limit: int = 100
) -> list[DeliveryPublic]:
    """The delivery log of this endpoint, newest first, each with its attempts."""
    with Session(engine) as session:
        endpoint_of(session, caller, partner_id, endpoint_id)
        rows = session.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(col(WebhookDelivery.created_at).desc())
            .limit(max(1, min(limit, 500)))
        ).all()
        return [delivery_public(session, d) for d in rows]


def delivery_public(session: Session, delivery: WebhookDelivery) -> DeliveryPublic:
    attempts = session.exec(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery.id)
        .order_by(col(WebhookAttempt.id))
    ).all()
    return DeliveryPublic(
        webhook_id=delivery.id,
        event_type=delivery.event_type,
        case_id=delivery.case_id,
        status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
        last_status_code=delivery.last_status_code,
        delivered_at=delivery.delivered_at,
        created_at=delivery.created_at,
        history=[
            AttemptPublic(at=a.at, status_code=a.status_code, error=a.error, duration_ms=a.duration_ms)
            for a in attempts
        ],
    )


@router.post(
    "/{endpoint_id}/deliveries/{webhook_id}/replay", response_model=DeliveryPublic, responses=RESPONSES
)
def replay(
    partner_id: str, endpoint_id: str, webhook_id: str, caller: Caller, engine: EngineDep
) -> DeliveryPublic:
    """Send this delivery again now, with the same `webhook-id`. A delivery being sent (or due within the
    sender's lease) is left as it is: that attempt is the replay, and no second one runs beside it."""
    with Session(engine, expire_on_commit=False) as session:
        endpoint = endpoint_of(session, caller, partner_id, endpoint_id)
        delivery = session.exec(
            select(WebhookDelivery).where(WebhookDelivery.id == webhook_id).with_for_update()
        ).first()
        if delivery is None or delivery.endpoint_id != endpoint_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no delivery with this id for this endpoint")
        if endpoint.disabled_at is not None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"the endpoint is disabled ({endpoint.disabled_reason}); nothing is sent to it: "
                f"POST .../webhook-endpoints/{endpoint_id}/enable first, then replay",
            )
        now, due = datetime.now(UTC), delivery.next_attempt_at
        due = due if due.tzinfo else due.replace(tzinfo=UTC)  # SQLite keeps no offset
        if not (delivery.status == "pending" and now < due <= now + LEASE):
            delivery.next_attempt_at = now
        delivery.status = "pending"
        session.add(delivery)
        session.commit()
        return delivery_public(session, delivery)
