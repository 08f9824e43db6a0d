"""A partner's HL7 v2 senders: the interface engines whose orders (ORM^O01, OMG^O19 over MLLP) intake takes for
it (services.intake.hl7_in). The same style, auth, validation and error bodies as its HL7 endpoints
(hl7_out_api)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from sqlmodel import Session, col, select

from contracts.triage import Reason
from services.auth import Caller
from services.auth.problems import problem_response
from services.common.config import get_settings
from services.common.db import transaction_lock
from services.intake.api import ERRORS, EngineDep, IdempotencyKey, idempotent
from services.intake.models import Hl7Sender, Hl7SenderCreate, Hl7SenderPublic
from services.intake.partner_scope import partner_scope

HL7_SENDER_LOCKS = 0x5EC0_E4D2  # advisory lock key space: registrations of one sending identity take turns

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: problem_response(404, "No such partner or sender visible to this key", "no HL7 sender …"),
    409: problem_response(
        409,
        "This MSH-3, MSH-4 and certificate are already registered as an enabled sender, or the partner has as "
        "many enabled senders as it may",
        "this MSH-3, MSH-4 and certificate are already registered as an enabled HL7 sender; use it",
    ),
}


def public(sender: Hl7Sender) -> Hl7SenderPublic:
    return Hl7SenderPublic(
        sender_id=sender.id,
        partner_id=sender.partner_id,
        sending_application=sender.sending_application,
        sending_facility=sender.sending_facility,
        certificate_sha256=sender.certificate_sha256 or None,
        default_reason=Reason(sender.default_reason) if sender.default_reason else None,
        exam_codes=json.loads(sender.exam_codes or "{}"),
        description=sender.description,
        enabled=sender.disabled_at is None,
        disabled_reason=sender.disabled_reason,
        created_at=sender.created_at,
    )


router = APIRouter(
    prefix="/v1/partners/{partner_id}/hl7-senders",
    tags=["HL7 v2 senders"],
    dependencies=[Depends(partner_scope("hl7-sender", "HL7 senders"))],
)


def certificate_fingerprint(body: Hl7SenderCreate, env: str) -> str:
    """The SHA-256 (lowercase hex) of the client certificate: as given, or of the PEM given; "" only in
    development (plain MLLP from loopback, matched on MSH-3 and MSH-4 alone)."""
    if body.certificate_sha256 and body.certificate_pem:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "send certificate_sha256 or certificate_pem, not both",
        )
    if body.certificate_pem:
        try:
            certificate = x509.load_pem_x509_certificate(body.certificate_pem.encode("utf-8"))
        except ValueError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "certificate_pem is not a PEM X.509 certificate (-----BEGIN CERTIFICATE-----); send the client "
                "certificate your engine presents, or its SHA-256 as certificate_sha256",
            ) from exc
        return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
    if body.certificate_sha256:
        return re.sub("[^0-9a-f]", "", body.certificate_sha256.lower())
    if env != "dev":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "a sender is recognised by its client certificate: send certificate_sha256 (the SHA-256 fingerprint "
            "of the certificate your engine presents over MLLP/TLS) or certificate_pem",
        )
    return ""


@router.post("", status_code=201, response_model=Hl7SenderPublic, responses=RESPONSES)
async def register(
    partner_id: str,
    body: Hl7SenderCreate,
    request: Request,
    caller: Caller,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Register your interface engine as a sender of orders (ORM^O01, OMG^O19) over MLLP (see docs/partners.md,
    "HL7 v2 orders in"): a message is taken when its MSH-3, MSH-4 and the TLS client certificate match this
    registration; the case is yours. A partner has at most WEBHOOK_ENDPOINTS_PER_PARTNER enabled senders."""
    fingerprint = certificate_fingerprint(body, get_settings().env)

    async def create() -> Hl7SenderPublic:
        sender = Hl7Sender(
            id=str(uuid.uuid4()),
            partner_id=partner_id,
            sending_application=body.sending_application,
            sending_facility=body.sending_facility,
            certificate_sha256=fingerprint,
            default_reason=body.default_reason.value if body.default_reason else "",
            exam_codes=json.dumps(body.exam_codes, sort_keys=True),
            description=body.description,
        )
        with Session(engine, expire_on_commit=False) as session:
            refuse_registered(session, sender)
            session.add(sender)
            session.commit()
        return public(sender)

    return await idempotent(request, caller, engine, idempotency_key, 201, create)


def refuse_registered(session: Session, wanted: Hl7Sender) -> None:
    """One enabled sender per MSH-3, MSH-4 and certificate, across partners: a message must name one partner.
    At most WEBHOOK_ENDPOINTS_PER_PARTNER enabled per partner."""
    identity = (wanted.sending_application, wanted.sending_facility, wanted.certificate_sha256)
    transaction_lock(session, HL7_SENDER_LOCKS, "|".join(identity))
    same = session.exec(
        select(Hl7Sender).where(
            Hl7Sender.sending_application == wanted.sending_application,
            Hl7Sender.sending_facility == wanted.sending_facility,
            Hl7Sender.certificate_sha256 == wanted.certificate_sha256,
            Hl7Sender.id != wanted.id,
            col(Hl7Sender.disabled_at).is_(None),
        )
    ).first()
    if same is not None:
        mine = f" as HL7 sender {same.id}" if same.partner_id == wanted.partner_id else ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"this MSH-3, MSH-4 and certificate are already registered{mine} and enabled; a message must name "
            "one sender: use it, DELETE it first, or use another certificate",
        )
    transaction_lock(session, HL7_SENDER_LOCKS, wanted.partner_id)
    enabled = session.exec(
        select(Hl7Sender).where(
            Hl7Sender.partner_id == wanted.partner_id,
            Hl7Sender.id != wanted.id,
            col(Hl7Sender.disabled_at).is_(None),
        )
    ).all()
    most = get_settings().webhook_endpoints_per_partner
    if len(enabled) >= most:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"the partner already has {most} enabled HL7 senders, the most it may have; DELETE one it no longer "
            "uses (GET the partner's hl7-senders lists them), then try again",
        )


@router.get("", response_model=list[Hl7SenderPublic], responses=RESPONSES)
def list_senders(partner_id: str, caller: Caller, engine: EngineDep) -> list[Hl7SenderPublic]:
    with Session(engine) as session:
        rows = session.exec(
            select(Hl7Sender).where(Hl7Sender.partner_id == partner_id).order_by(col(Hl7Sender.created_at))
        ).all()
    return [public(s) for s in rows]


@router.delete("/{sender_id}", status_code=204, responses=RESPONSES)
def disable(partner_id: str, sender_id: str, caller: Caller, engine: EngineDep) -> Response:
    """Stop taking orders from this sender: its messages are answered AR from now on."""
    with Session(engine) as session:
        sender = session.get(Hl7Sender, sender_id)
        if sender is None or sender.partner_id != partner_id:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, "no HL7 sender with this id; GET the partner's hl7-senders"
            )
        if sender.disabled_at is None:
            sender.disabled_at = datetime.now(UTC)
            sender.disabled_reason = "disabled by the partner"
            session.add(sender)
            session.commit()
    return Response(status_code=204)
