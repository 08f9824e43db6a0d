"""Inbound partner webhooks (`POST /webhooks/partners/{partner_id}`), signed per Standard Webhooks.

Body: `{"type": ..., "timestamp": ..., "data": {...}}`. Types: `case.requested` (data: the FHIR transaction
Bundle `POST /fhir` takes), `records.available`, `document.added`, `case.cancelled`. Every check runs before
anything is stored or enqueued; a `webhook-id` is processed once (kept with its answer, never purged
before 3 days) and a replay gets the first answer.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client

from contracts.decisions import CancelCase
from contracts.envelope import new_event
from contracts.events import RecordsAvailable
from services.auth import AuthEngine, Principal, Role
from services.auth import audit as audit_log
from services.auth.models import Partner
from services.auth.problems import problem_response
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.errors import IntakeRejected
from services.common.http import problem, unstorable_field
from services.intake import decisions, fhir_intake, idempotency
from services.intake.api import (
    Audit,
    EngineDep,
    SettingsDep,
    TemporalDep,
    decode_content,
    open_case,
    signal_consent,
    store_document,
    visible_case,
)
from services.intake.handlers import SOURCE
from services.intake.models import DocumentCreate
from services.intake.webhook_signing import WebhookRejected, read_headers, verify

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

MAX_BODY_BYTES = 10 * 1024 * 1024
EVENT_TYPES = ("case.requested", "records.available", "document.added", "case.cancelled")


class WebhookEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[a-z]+\.[a-z_]+$", description=", ".join(EVENT_TYPES))
    timestamp: str = Field(max_length=40)
    data: dict[str, Any]


class CaseRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case_id: str = Field(min_length=1, max_length=36)


class RecordsAvailableData(CaseRef):
    study_instance_uid: str | None = Field(default=None, pattern=r"^[0-9.]{1,64}$")
    endpoint: str | None = Field(default=None, max_length=500)
    note: str = Field(default="", max_length=500)


class DocumentAddedData(CaseRef):
    document: DocumentCreate


class CaseCancelledData(CaseRef):
    reason: str = Field(min_length=3, max_length=500)


class WebhookAccepted(BaseModel):
    status: str = Field(examples=["accepted"])
    case_id: str | None = None


RESPONSES: dict[int | str, dict[str, Any]] = {
    code: problem_response(code, text, text)
    for code, text in {
        400: "a webhook header or the body is malformed, or the timestamp is outside 5 minutes",
        401: "no signature matches the partner's secret",
        404: "no such partner, or the case is not the partner's",
        409: "the case's state does not allow it, or the first delivery of this id is still running",
        413: "the body is larger than 10 MB",
        422: "the event type or its data is invalid; `errors` names each field",
        503: "the workflow service is unreachable; redeliver later",
    }.items()
}


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise WebhookRejected(413, "the body is larger than 10 MB; send documents separately")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise WebhookRejected(413, "the body is larger than 10 MB; send documents separately")
    return bytes(body)


def parse(body: bytes) -> WebhookEnvelope:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookRejected(400, "the body is not UTF-8 JSON") from exc
    try:
        envelope = WebhookEnvelope.model_validate_json(text)
    except ValidationError as exc:
        raise WebhookRejected(400, "the body is not a webhook envelope {type, timestamp, data}") from exc
    if envelope.type not in EVENT_TYPES:
        raise WebhookRejected(
            422, f"event type {envelope.type} is not accepted; send one of {', '.join(EVENT_TYPES)}"
        )
    # The body is read here whatever its Content-Type, so the guard on JSON bodies may not have seen it: a NUL
    # in a text was taken into a case and sent on to every service, past the guard meant to keep it out.
    found = unstorable_field({"timestamp": envelope.timestamp, "data": envelope.data}, fhir=False)
    if found is not None:
        where, reason = found
        raise WebhookRejected(422, f"the event's {where} {reason}; nothing was stored")
    return envelope


M = TypeVar("M", bound=BaseModel)


def data_as(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join("data." + ".".join(str(p) for p in e["loc"]) for e in exc.errors()[:10])
        raise WebhookRejected(422, f"the event data is invalid; fix: {fields}") from exc


SIGNED_BODY = {
    "parameters": [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": text}
        for name, text in (
            ("webhook-id", "unique per event; a replayed id is processed once"),
            ("webhook-timestamp", "Unix seconds; refused when more than 5 minutes off"),
            (
                "webhook-signature",
                "`v1,<base64 HMAC-SHA256 of id.timestamp.body>`, space-separated when several",
            ),
        )
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": WebhookEnvelope.model_json_schema(),
                "example": {
                    "type": "records.available",
                    "timestamp": "2026-11-28T04:00:00Z",
                    "data": {"case_id": "3f6c…", "study_instance_uid": "1.2.840.1", "note": "on our PACS"},
                },
            }
        },
    },
}


@router.post(
    "/partners/{partner_id}", response_model=WebhookAccepted, responses=RESPONSES, openapi_extra=SIGNED_BODY
)
async def receive(
    partner_id: str,
    request: Request,
    auth: AuthEngine,
    engine: EngineDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> JSONResponse:
    """One signed event from a partner; a 2xx means it was processed (or was a replay)."""
    owner = f"webhook:{partner_id}"
    try:
        body = await read_body(request)
        partner = await run_in_threadpool(find_partner, auth, partner_id)
        signed = read_headers(request.headers, time.time())
        verify(partner.webhook_secrets(datetime.now(UTC)), signed, body)
        envelope = await run_in_threadpool(parse, body)
        print_ = hashlib.sha256(body).hexdigest()
        try:
            stored = await run_in_threadpool(idempotency.claim, engine, owner, signed.webhook_id, print_)
        except idempotency.KeyReusedWithOtherBody as exc:
            raise WebhookRejected(422, "this webhook-id was already used for another event") from exc
        except idempotency.StillRunning as exc:
            raise WebhookRejected(409, "the first delivery of this webhook-id is still running") from exc
        if stored is not None:
            return JSONResponse({**stored.body, "status": "duplicate"}, status_code=200)
        caller = Principal(key_id="webhook", role=Role.PARTNER, partner_id=partner.id)
        audit = Audit(request, caller, auth)
        try:
            answer = await process(envelope, caller, audit, engine, temporal, settings, signed.webhook_id)
        except BaseException:
            await run_in_threadpool(idempotency.release, engine, owner, signed.webhook_id)
            raise
        await run_in_threadpool(
            idempotency.complete, engine, owner, signed.webhook_id, 200, answer.model_dump()
        )
        return JSONResponse(answer.model_dump(), status_code=200)
    except WebhookRejected as exc:
        if exc.status in (400, 401, 404, 413):
            await run_in_threadpool(audit_denied, auth, partner_id, exc.detail)
        return problem(exc.status, "Webhook rejected", exc.detail)
    except IntakeRejected as exc:
        return problem(422, "Webhook rejected", str(exc))
    except fhir_intake.FhirInvalid as exc:
        errors = [{"field": f"data.{i.expression}", "message": i.diagnostics} for i in exc.issues]
        return problem(422, "Webhook rejected", "the FHIR Bundle in data is invalid", errors)
    except StarletteHTTPException as exc:
        return problem(exc.status_code, "Webhook rejected", str(exc.detail))


def audit_denied(auth: Engine, partner_id: str, detail: str) -> None:
    audit_log.record(
        auth,
        actor="webhook",
        partner_id=partner_id[:64],
        role=None,
        service="intake",
        action="create",
        resource="webhook",
        outcome="denied",
        detail=detail,
    )


def find_partner(auth: Engine, partner_id: str) -> Partner:
    with Session(auth) as session:
        partner = session.get(Partner, partner_id)
    if partner is None:
        raise WebhookRejected(404, "no partner with this id; check the URL you were given")
    return partner


async def process(
    envelope: WebhookEnvelope,
    caller: Principal,
    audit: Audit,
    engine: Engine,
    temporal: Client | None,
    settings: Settings,
    webhook_id: str,
) -> WebhookAccepted:
    if envelope.type == "case.requested":
        parsed = await run_in_threadpool(fhir_intake.from_bundle, envelope.data)  # seconds for a large one
        case, _ = await open_case(parsed.case, parsed.documents, caller, audit, engine, temporal, settings)
        return WebhookAccepted(status="accepted", case_id=case.id)
    if envelope.type == "records.available":
        available = data_as(RecordsAvailableData, envelope.data)
        await run_in_threadpool(announce_records, engine, caller, audit, available, webhook_id)
        return WebhookAccepted(status="accepted", case_id=available.case_id)
    if envelope.type == "document.added":
        added = data_as(DocumentAddedData, envelope.data)
        content = decode_content(added.document)
        document = await run_in_threadpool(
            store_document, engine, added.case_id, added.document, content, caller, audit
        )
        if document.kind.value == "records_release_authorization":
            await signal_consent(engine, temporal, document)
        return WebhookAccepted(status="accepted", case_id=added.case_id)
    cancelled = data_as(CaseCancelledData, envelope.data)
    with Session(engine) as session:
        visible_case(session, cancelled.case_id, caller, audit, "update")
    try:
        await decisions.cancel(
            temporal,
            cancelled.case_id,
            CancelCase(by=f"partner:{caller.partner_id}", reason=cancelled.reason),
        )
    except decisions.WorkflowRejected as exc:
        raise WebhookRejected(409, f"the case cannot be cancelled: {exc}") from exc
    except decisions.WorkflowUnreachable as exc:
        raise WebhookRejected(503, str(exc)) from exc
    audit("update", "case.cancel", cancelled.case_id, "success")
    return WebhookAccepted(status="accepted", case_id=cancelled.case_id)


def announce_records(
    engine: Engine, caller: Principal, audit: Audit, data: RecordsAvailableData, webhook_id: str
) -> None:
    """Publish `records.available` (through the outbox, with the case check in the same transaction)."""
    with Session(engine) as session:
        visible_case(session, data.case_id, caller, audit, "update")
        enqueue(
            session,
            EVENTS,
            new_event(
                id=f"webhook:{caller.partner_id}:{webhook_id}",
                source=SOURCE,
                subject=data.case_id,
                data=RecordsAvailable(
                    case_id=data.case_id,
                    study_instance_uid=data.study_instance_uid,
                    endpoint=data.endpoint,
                    note=data.note,
                ),
            ),
        )
        session.commit()
    audit("update", "case.records", data.case_id, "success")
