"""A partner's HL7 v2 MLLP endpoints (its interface engine), their message log, and manual replay: the same
style, auth, validation and error bodies as the webhook endpoints (webhooks_out_api)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from sqlmodel import Session, col, select

from services.auth import Caller
from services.auth.problems import problem_response
from services.common.config import get_settings
from services.common.db import transaction_lock
from services.intake.api import ERRORS, EngineDep, IdempotencyKey, idempotent
from services.intake.hl7_out import LEASE, check_endpoint
from services.intake.host_lookup import EndpointRefused
from services.intake.models import (
    Hl7Attempt,
    Hl7AttemptPublic,
    Hl7Endpoint,
    Hl7EndpointCreate,
    Hl7EndpointPublic,
    Hl7Message,
    Hl7MessagePublic,
)
from services.intake.partner_scope import partner_scope

HL7_ENDPOINT_LOCKS = (
    0x5EC0_E4D1  # advisory lock key space: one partner's HL7 endpoint registrations take turns
)

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: problem_response(
        404, "No such partner, endpoint or message visible to this key", "no HL7 endpoint …"
    ),
    409: problem_response(
        409,
        "The listener is already registered, the partner has as many enabled endpoints as it may, "
        "or (replay) the endpoint is disabled",
        "this listener is already registered as HL7 endpoint …; use it",
    ),
}


def public(endpoint: Hl7Endpoint) -> Hl7EndpointPublic:
    return Hl7EndpointPublic(
        endpoint_id=endpoint.id,
        partner_id=endpoint.partner_id,
        host=endpoint.host,
        port=endpoint.port,
        tls=endpoint.tls,
        receiving_application=endpoint.receiving_application,
        receiving_facility=endpoint.receiving_facility,
        assigning_authority=endpoint.assigning_authority or endpoint.receiving_facility,
        description=endpoint.description,
        enabled=endpoint.disabled_at is None,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
    )


router = APIRouter(
    prefix="/v1/partners/{partner_id}/hl7-endpoints",
    tags=["HL7 v2 endpoints"],
    dependencies=[Depends(partner_scope("hl7-endpoint", "HL7 endpoints"))],
)


def endpoint_of(session: Session, partner_id: str, endpoint_id: str) -> Hl7Endpoint:
    endpoint = session.get(Hl7Endpoint, endpoint_id)
    if endpoint is None or endpoint.partner_id != partner_id:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, "no HL7 endpoint with this id; GET the partner's hl7-endpoints"
        )
    return endpoint


@router.post("", status_code=201, response_model=Hl7EndpointPublic, responses=RESPONSES)
async def register(
    partner_id: str,
    body: Hl7EndpointCreate,
    request: Request,
    caller: Caller,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Register your interface engine's MLLP listener: each delivered report, and each later version of it, is
    sent to it as an HL7 v2.5.1 ORU^R01 (see docs/partners.md, "HL7 v2 over MLLP"). The host must resolve to a
    public address, as for webhook endpoints, and TLS is required (plain MLLP to loopback only in development).
    A partner has at most WEBHOOK_ENDPOINTS_PER_PARTNER enabled HL7 endpoints."""
    host = body.host.strip().lower()
    try:
        # On a thread: the host's DNS lookup (up to DNS_TIMEOUT) must not hold the event loop.
        await asyncio.to_thread(check_endpoint, host, body.port, body.tls, get_settings().env)
    except EndpointRefused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    async def create() -> Hl7EndpointPublic:
        endpoint = Hl7Endpoint(
            id=str(uuid.uuid4()),
            partner_id=partner_id,
            host=host,
            port=body.port,
            tls=body.tls,
            receiving_application=body.receiving_application,
            receiving_facility=body.receiving_facility,
            assigning_authority=body.assigning_authority or "",
            description=body.description,
        )
        with Session(engine, expire_on_commit=False) as session:
            refuse_registered(session, endpoint)
            session.add(endpoint)
            session.commit()
        return public(endpoint)

    return await idempotent(request, caller, engine, idempotency_key, 201, create)


def refuse_registered(session: Session, wanted: Hl7Endpoint) -> None:
    """One enabled endpoint per listener and receiving application and facility: registered twice, each
    report would be filed twice under two control ids. At most WEBHOOK_ENDPOINTS_PER_PARTNER enabled."""
    transaction_lock(session, HL7_ENDPOINT_LOCKS, wanted.partner_id)
    enabled = session.exec(
        select(Hl7Endpoint).where(
            Hl7Endpoint.partner_id == wanted.partner_id, col(Hl7Endpoint.disabled_at).is_(None)
        )
    ).all()
    others = [e for e in enabled if e.id != wanted.id]
    for endpoint in others:
        same = (endpoint.host, endpoint.port, endpoint.receiving_application, endpoint.receiving_facility)
        if same == (wanted.host, wanted.port, wanted.receiving_application, wanted.receiving_facility):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"this listener, receiving application and facility are already registered as HL7 endpoint "
                f"{endpoint.id}, which is enabled; use it, or DELETE it first",
            )
    most = get_settings().webhook_endpoints_per_partner
    if len(others) >= most:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"the partner already has {most} enabled HL7 endpoints, the most it may have; DELETE one it no "
            "longer uses (GET the partner's hl7-endpoints lists them), then try again",
        )


@router.get("", response_model=list[Hl7EndpointPublic], responses=RESPONSES)
def list_endpoints(partner_id: str, caller: Caller, engine: EngineDep) -> list[Hl7EndpointPublic]:
    with Session(engine) as session:
        rows = session.exec(
            select(Hl7Endpoint)
            .where(Hl7Endpoint.partner_id == partner_id)
            .order_by(col(Hl7Endpoint.created_at))
        ).all()
    return [public(e) for e in rows]


@router.delete("/{endpoint_id}", status_code=204, responses=RESPONSES)
def disable(partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep) -> Response:
    """Stop sending to this endpoint (its message log is kept)."""
    with Session(engine) as session:
        endpoint = endpoint_of(session, partner_id, endpoint_id)
        if endpoint.disabled_at is None:
            endpoint.disabled_at = datetime.now(UTC)
            endpoint.disabled_reason = "disabled by the partner"
            session.add(endpoint)
            session.commit()
    return Response(status_code=204)


@router.post("/{endpoint_id}/enable", response_model=Hl7EndpointPublic, responses=RESPONSES)
def enable(partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep) -> Hl7EndpointPublic:
    """Send to this endpoint again; pending messages resume."""
    with Session(engine, expire_on_commit=False) as session:
        endpoint = endpoint_of(session, partner_id, endpoint_id)
        refuse_registered(session, endpoint)
        endpoint.disabled_at = None
        endpoint.disabled_reason = ""
        session.add(endpoint)
        session.commit()
    return public(endpoint)


@router.get("/{endpoint_id}/messages", response_model=list[Hl7MessagePublic], responses=RESPONSES)
def messages(
    partner_id: str, endpoint_id: str, caller: Caller, engine: EngineDep, limit: int = 100
) -> list[Hl7MessagePublic]:
    """The message log of this endpoint, newest first, each with its attempts and their ACK codes."""
    with Session(engine) as session:
        endpoint_of(session, partner_id, endpoint_id)
        rows = session.exec(
            select(Hl7Message)
            .where(Hl7Message.endpoint_id == endpoint_id)
            .order_by(col(Hl7Message.created_at).desc())
            .limit(max(1, min(limit, 500)))
        ).all()
        return [message_public(session, m) for m in rows]


def message_public(session: Session, message: Hl7Message) -> Hl7MessagePublic:
    attempts = session.exec(
        select(Hl7Attempt).where(Hl7Attempt.message_id == message.id).order_by(col(Hl7Attempt.id))
    ).all()
    return Hl7MessagePublic(
        control_id=message.id,
        case_id=message.case_id,
        result_status=message.result_status,
        status=message.status,
        attempts=message.attempts,
        next_attempt_at=message.next_attempt_at if message.status == "pending" else None,
        last_ack_code=message.last_ack_code,
        delivered_at=message.delivered_at,
        created_at=message.created_at,
        history=[
            Hl7AttemptPublic(at=a.at, ack_code=a.ack_code, error=a.error, duration_ms=a.duration_ms)
            for a in attempts
        ],
    )


@router.post(
    "/{endpoint_id}/messages/{control_id}/replay", response_model=Hl7MessagePublic, responses=RESPONSES
)
def replay(
    partner_id: str, endpoint_id: str, control_id: str, caller: Caller, engine: EngineDep
) -> Hl7MessagePublic:
    """Send this message again now, with the same MSH-10. A message being sent (or due within the sender's
    lease) is left as it is: that attempt is the replay."""
    with Session(engine, expire_on_commit=False) as session:
        endpoint = endpoint_of(session, partner_id, endpoint_id)
        message = session.exec(
            select(Hl7Message).where(Hl7Message.id == control_id).with_for_update()
        ).first()
        if message is None or message.endpoint_id != endpoint_id:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, "no message with this control id for this endpoint"
            )
        if endpoint.disabled_at is not None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"the endpoint is disabled ({endpoint.disabled_reason}); nothing is sent to it: "
                f"POST .../hl7-endpoints/{endpoint_id}/enable first, then replay",
            )
        now, due = datetime.now(UTC), message.next_attempt_at
        due = due if due.tzinfo else due.replace(tzinfo=UTC)  # SQLite keeps no offset
        if not (message.status == "pending" and now < due <= now + LEASE):
            message.next_attempt_at = now
        message.status = "pending"
        session.add(message)
        session.commit()
        return message_public(session, message)
