"""`[base]/Subscription`: a partner's FHIR Subscriptions (R5 Backport on R4): create, read, search by status,
delete (turns it off), and `$status`. Another partner's subscription is a 404. Errors are OperationOutcomes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from services.auth import Principal, Role, require_role
from services.common.db import transaction_lock
from services.common.fhir import outcome, outcome_response, unparseable
from services.common.http import UnreadableJson
from services.intake import fhir_subscriptions as subs
from services.intake.api import EngineDep, SettingsDep
from services.intake.fhir_intake import FhirInvalid
from services.intake.fhir_service_request import fhir_base
from services.intake.models import FhirSubscription, WebhookDelivery, WebhookEndpoint
from services.intake.webhooks_out import EndpointRefused, check_url

FHIR_JSON = "application/fhir+json"
SUBSCRIPTION_LOCKS = 0x5EC0_F5B5  # advisory lock key space: one partner's subscription creates take turns
PartnerCaller = Annotated[Principal, Depends(require_role(Role.PARTNER))]

SUBSCRIPTION_EXAMPLE: dict[str, Any] = {
    "resourceType": "Subscription",
    "status": "requested",
    "reason": "our EHR follows the second opinions it ordered",
    "criteria": "https://api.example.org/fhir/SubscriptionTopic/case-status",
    "_criteria": {"extension": [{"url": subs.FILTER_CRITERIA, "valueString": "Task?status=completed"}]},
    "channel": {
        "type": "rest-hook",
        "endpoint": "https://ehr.example.org/fhir-notifications",
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": subs.PAYLOAD_CONTENT, "valueCode": "id-only"}]},
        "header": ["Authorization: Bearer …"],
        "extension": [{"url": subs.HEARTBEAT_PERIOD, "valueUnsignedInt": 3600}],
    },
}
SCHEMA = {"type": "object", "properties": {"resourceType": {"type": "string"}}, "required": ["resourceType"]}


def _doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {FHIR_JSON: {"schema": SCHEMA, "example": example}}}


OUTCOME_SCHEMA = {"$ref": "#/components/schemas/OperationOutcome"}


def _outcome_doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {FHIR_JSON: {"schema": OUTCOME_SCHEMA, "example": example}},
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    401: _outcome_doc("No or an unknown key", outcome("login", [(None, "send Authorization: Bearer …")])),
    403: _outcome_doc("Not a partner's key", outcome("forbidden", [(None, "subscriptions are a partner's")])),
    404: _outcome_doc(
        "No such subscription of yours", outcome("not-found", [("Subscription.id", "no Subscription …")])
    ),
    406: _outcome_doc("Only JSON is served", outcome("not-supported", [(None, "send _format=json")])),
}
CREATE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: _outcome_doc("The body is not JSON", outcome("structure", [(None, "the body is not JSON")])),
    409: _outcome_doc(
        "The partner has as many subscriptions on as it may",
        outcome("conflict", [(None, "DELETE one you no longer use")]),
    ),
    415: _outcome_doc(
        "The body is not JSON", outcome("not-supported", [(None, f"Content-Type: {FHIR_JSON}")])
    ),
    422: _outcome_doc(
        "The Subscription is invalid, or asks for what is not served (a topic, a filter, a channel); the "
        "OperationOutcome names each element",
        outcome("invalid", [("Subscription.channel.endpoint", "the endpoint URL must use https")]),
    ),
}


def not_found() -> JSONResponse:
    return outcome_response(
        404, "not-found", [("Subscription.id", "no Subscription with this id is visible to this key")]
    )


def owned(
    session: Session, caller: Principal, subscription_id: str
) -> tuple[FhirSubscription, WebhookEndpoint] | None:
    subscription = session.get(FhirSubscription, subscription_id)
    if subscription is None or subscription.partner_id != caller.partner_id:
        return None
    endpoint = session.get(WebhookEndpoint, subscription_id)
    assert endpoint is not None, "a subscription's channel is kept with it"
    return subscription, endpoint


async def create_subscription(
    request: Request, caller: PartnerCaller, engine: EngineDep, settings: SettingsDep
) -> Response:
    """Subscribe to a topic (`criteria`: `[base]/SubscriptionTopic/case-status` or `.../report-ready`; filter
    with the `backport-filter-criteria` extension `Task?status=…`) with a rest-hook channel to an https URL at a
    public address; `channel.header` values are sent with every notification. Answered `requested`: a
    handshake is sent now, and a 2xx answer makes it `active`."""
    from services.intake.fhir_api import read_json  # the FHIR router's body reader (parsed once, size-capped)

    base = fhir_base(settings)
    try:
        document = await read_json(request)
        wanted = subs.read_subscription(document, base)
    except UnreadableJson as exc:
        return unparseable(exc)
    except FhirInvalid as exc:
        return outcome_response(422, "invalid", [(i.expression, i.diagnostics) for i in exc.issues])
    try:
        await asyncio.to_thread(check_url, wanted.url, settings.env)  # its DNS lookup off the event loop
    except EndpointRefused as exc:
        return outcome_response(422, "invalid", [("Subscription.channel.endpoint", str(exc))])
    return await run_in_threadpool(_create, engine, settings, caller, wanted, document)


def _create(engine: Any, settings: Any, caller: Principal, wanted: subs.SubscriptionRequest,
            document: dict[str, Any]) -> Response:  # fmt: skip
    partner_id = str(caller.partner_id)
    base = fhir_base(settings)
    endpoint, subscription = subs.new_subscription(partner_id, wanted, document)
    with Session(engine, expire_on_commit=False) as session:
        transaction_lock(session, SUBSCRIPTION_LOCKS, partner_id)
        on = session.exec(
            select(FhirSubscription).where(
                FhirSubscription.partner_id == partner_id, FhirSubscription.status != "off"
            )
        ).all()
        most = settings.fhir_subscriptions_per_partner
        if len(on) >= most:
            return outcome_response(
                409,
                "conflict",
                [(None, f"you already have {most} Subscriptions on, the most you may have; DELETE one you no "
                        "longer use (GET [base]/Subscription lists them), then try again")],
            )  # fmt: skip
        session.add(endpoint)
        session.flush()
        session.add(subscription)
        session.flush()
        subs.handshake(session, base, subscription)
        session.commit()
        resource = subs.as_resource(base, subscription, "requested", "")
    location = f"{base}/Subscription/{subscription.id}/_history/1"
    return JSONResponse(
        resource, status_code=201, media_type=FHIR_JSON, headers={"Location": location, "ETag": 'W/"1"'}
    )


def read_subscription(
    subscription_id: str, caller: PartnerCaller, engine: EngineDep, settings: SettingsDep
) -> Response:
    """Your Subscription, its `status` as it is now (`requested`, `active`, `error` with `error` saying why,
    or `off`); `channel.header` values are not shown."""
    with Session(engine) as session:
        found = owned(session, caller, subscription_id)
        if found is None:
            return not_found()
        subscription, endpoint = found
        status, error = subs.current_status(session, subscription, endpoint)
        resource = subs.as_resource(fhir_base(settings), subscription, status, error)
    return JSONResponse(resource, media_type=FHIR_JSON)


def search_subscriptions(
    request: Request,
    caller: PartnerCaller,
    engine: EngineDep,
    settings: SettingsDep,
    status: str | None = None,
) -> Response:
    """Your Subscriptions (another partner's are not there), oldest first, as a searchset Bundle; `status`
    (requested | active | error | off, comma-separated for any of them) keeps those with that status now."""
    base = fhir_base(settings)
    wanted = {s for s in (status or "").split(",") if s}
    unknown = wanted - {"requested", "active", "error", "off"}
    if unknown:
        return outcome_response(400, "invalid", [("status", "status is requested, active, error or off")])
    entries = []
    with Session(engine) as session:
        rows = session.exec(
            select(FhirSubscription, WebhookEndpoint)
            .join(WebhookEndpoint, col(WebhookEndpoint.id) == FhirSubscription.id)
            .where(FhirSubscription.partner_id == caller.partner_id)
            .order_by(col(FhirSubscription.created_at), col(FhirSubscription.id))
        ).all()
        for subscription, endpoint in rows:
            now, error = subs.current_status(session, subscription, endpoint)
            if wanted and now not in wanted:
                continue
            entries.append(
                {
                    "fullUrl": f"{base}/Subscription/{subscription.id}",
                    "resource": subs.as_resource(base, subscription, now, error),
                    "search": {"mode": "match"},
                }
            )
    query = f"?status={','.join(sorted(wanted))}" if wanted else ""
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{base}/Subscription{query}"}],
        "entry": entries,
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)


def delete_subscription(subscription_id: str, caller: PartnerCaller, engine: EngineDep) -> Response:
    """Turn your Subscription off: nothing more is queued or sent (notifications not yet delivered are
    cancelled); it stays readable, `status` off, and its delivery log is kept."""
    with Session(engine) as session:
        found = owned(session, caller, subscription_id)
        if found is None:
            return not_found()
        subscription, endpoint = found
        if subscription.status != "off":
            subscription.status = "off"
            endpoint.disabled_at = endpoint.disabled_at or datetime.now(UTC)
            endpoint.disabled_reason = "the Subscription was deleted"
            pending = session.exec(
                select(WebhookDelivery).where(
                    WebhookDelivery.endpoint_id == subscription_id, WebhookDelivery.status == "pending"
                )
            ).all()
            for delivery in pending:
                delivery.status = "cancelled"
                session.add(delivery)
            session.add(subscription)
            session.add(endpoint)
            session.commit()
    said: list[tuple[str | None, str]] = [
        (None, "the Subscription is off; nothing more is sent to its endpoint")
    ]
    return JSONResponse(outcome("informational", said, severity="information"), media_type=FHIR_JSON)


def subscription_status(
    subscription_id: str, caller: PartnerCaller, engine: EngineDep, settings: SettingsDep
) -> Response:
    """`$status`: a searchset Bundle with the subscription's SubscriptionStatus (a Parameters,
    backport-subscription-status-r4, type query-status): its status, events since it started, and the error."""
    base = fhir_base(settings)
    with Session(engine) as session:
        found = owned(session, caller, subscription_id)
        if found is None:
            return not_found()
        subscription, endpoint = found
        status, error = subs.current_status(session, subscription, endpoint)
        parameters = subs.status_parameters(base, subscription, "query-status", status, error or None)
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "entry": [
            {"fullUrl": f"urn:uuid:{parameters['id']}", "resource": parameters, "search": {"mode": "match"}}
        ],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)


STATUS_EXAMPLE = {
    "resourceType": "Bundle",
    "type": "searchset",
    "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [{"name": "status", "valueCode": "active"}]}}
    ],
}


def add_routes(router: APIRouter) -> None:
    """Add the Subscription routes to intake's FHIR router (before its route answering what is not declared)."""
    body = {
        "requestBody": {
            "required": True,
            "content": {FHIR_JSON: {"schema": {"type": "object"}, "example": SUBSCRIPTION_EXAMPLE}},
        }
    }
    router.add_api_route(
        "/Subscription",
        create_subscription,
        methods=["POST"],
        status_code=201,
        responses={
            201: _doc("the Subscription, `requested`; Location its URL", SUBSCRIPTION_EXAMPLE),
            **CREATE_ERRORS,
        },  # fmt: skip
        openapi_extra=body,
    )
    router.add_api_route(
        "/Subscription",
        search_subscriptions,
        methods=["GET"],
        responses={
            200: _doc("a searchset Bundle of your Subscriptions", {"resourceType": "Bundle"}),
            400: _outcome_doc("status is not one of the codes", outcome("invalid", [("status", "…")])),
            **ERRORS,
        },  # fmt: skip
    )
    router.add_api_route(
        "/Subscription/{subscription_id}/$status",
        subscription_status,
        methods=["GET"],
        responses={200: _doc("the subscription's status (a searchset Bundle)", STATUS_EXAMPLE), **ERRORS},
    )
    router.add_api_route(
        "/Subscription/{subscription_id}",
        read_subscription,
        methods=["GET"],
        responses={200: _doc("your Subscription, its status now", SUBSCRIPTION_EXAMPLE), **ERRORS},
    )
    router.add_api_route(
        "/Subscription/{subscription_id}",
        delete_subscription,
        methods=["DELETE"],
        responses={200: _outcome_doc("turned off", outcome("informational", [(None, "off")])), **ERRORS},
    )
