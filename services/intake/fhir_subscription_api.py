"""`[base]/Subscription`: a partner's FHIR Subscriptions (R5 Backport on R4): create, read, update (version-aware
with If-Match), search by status, delete (turns it off), and `$status`. Another partner's subscription is a 404.
Errors are OperationOutcomes."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from services.auth import Principal, Role, require_role
from services.common.db import transaction_lock
from services.common.fhir import etag, outcome, outcome_response, unparseable
from services.common.http import UnreadableJson
from services.intake import fhir_subscriptions as subs
from services.intake.api import EngineDep, SettingsDep
from services.intake.fhir_intake import FhirInvalid
from services.intake.fhir_service_request import fhir_base
from services.intake.fhir_subscription_update import (
    UPDATE_STATUSES,
    UpdateRefused,
    apply_update,
    pending_deliveries,
    turn_off,
)
from services.intake.models import FhirSubscription, WebhookEndpoint
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


UPDATE_ERRORS: dict[int | str, dict[str, Any]] = {
    **CREATE_ERRORS,
    400: _outcome_doc(
        "The body is not JSON, its id is not the URL's, or If-Match is not an ETag",
        outcome("invalid", [("Subscription.id", "the body's id must be the id in the URL")]),
    ),
    404: _outcome_doc(
        "No such subscription of yours (update does not create one)",
        outcome("not-found", [("Subscription.id", "no Subscription …; update does not create one")]),
    ),
    409: _outcome_doc(
        "Turning it back on would pass the partner's limit of Subscriptions on",
        outcome("conflict", [(None, "DELETE one you no longer use")]),
    ),
    412: _outcome_doc(
        "If-Match names another version than the current one",
        outcome("conflict", [(None, "the Subscription is at version 3, not 2 (If-Match) …")]),
    ),
    422: _outcome_doc(
        "The Subscription is invalid, asks for what is not served, or changes what cannot change (the topic); "
        "the OperationOutcome names each element",
        outcome("invalid", [("Subscription.criteria", "the topic of a Subscription cannot change …")]),
    ),
}


def not_found() -> JSONResponse:
    return outcome_response(
        404, "not-found", [("Subscription.id", "no Subscription with this id is visible to this key")]
    )


def owned(
    session: Session, caller: Principal, subscription_id: str, lock: bool = False
) -> tuple[FhirSubscription, WebhookEndpoint] | None:
    """The caller's subscription and its channel, or None; `lock`: its row locked to the end of the transaction
    (a change waits for another under way, and then sees it)."""
    query = select(FhirSubscription).where(
        FhirSubscription.id == subscription_id, FhirSubscription.partner_id == caller.partner_id
    )
    subscription = session.exec(query.with_for_update() if lock else query).first()
    if subscription is None:
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

    try:
        document = await read_json(request)
    except UnreadableJson as exc:
        return unparseable(exc)
    wanted = await _checked(document, settings)
    if isinstance(wanted, Response):
        return wanted
    return await run_in_threadpool(_create, engine, settings, caller, wanted, document)


async def _checked(
    document: Any, settings: Any, statuses: tuple[str, ...] = ("requested",)
) -> subs.SubscriptionRequest | Response:
    """The Subscription a create (`requested`) or an update (`statuses`) sent, read and its endpoint checked
    (the DNS lookup off the event loop), or the 422 saying what is wrong."""
    try:
        wanted = subs.read_subscription(document, fhir_base(settings), statuses)
    except FhirInvalid as exc:
        return outcome_response(422, "invalid", [(i.expression, i.diagnostics) for i in exc.issues])
    try:
        await asyncio.to_thread(check_url, wanted.url, settings.env)
    except EndpointRefused as exc:
        return outcome_response(422, "invalid", [("Subscription.channel.endpoint", str(exc))])
    return wanted


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
    return JSONResponse(resource, media_type=FHIR_JSON, headers={"ETag": etag(resource)})


IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=100,
        description='version-aware update: the ETag a read answered (`W/"3"`); another version is a 412',
    ),
]


def version_matched(if_match: str) -> int | None:
    """The version an If-Match names (`W/"3"`, `"3"`, or fhirpy's bare `3`; `*` any: None); ValueError if none."""
    tag = if_match.strip().removeprefix("W/").strip('"')
    if tag == "*":
        return None
    if not tag.isdigit() or len(tag) > 9:
        raise ValueError(tag)
    return int(tag)


async def update_subscription(
    subscription_id: str,
    request: Request,
    caller: PartnerCaller,
    engine: EngineDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> Response:
    """Update your Subscription with the whole resource (FHIR update; its `id` the URL's), validated as a create
    is. May change: the filter, `channel.endpoint` and `channel.header` (a header sent back as a read shows it,
    `Name: (not shown)`, keeps its value), the heartbeat period, the payload content, and `status`: `off` turns
    it off as DELETE does, `requested` turns an `off` or `error` one back on (`active` or `error` as read leave
    it as it is). A new endpoint or headers, or turning it back on, sends a new handshake, ahead of the
    notifications still pending, which then go to the endpoint as it is now. The topic cannot change (422:
    create a new Subscription). Answered 200 with the resource, `meta.versionId` one more (the same when
    nothing changed), ETag and Location `…/_history/{version}`; `If-Match: W/"n"` naming another version than
    the current is a 412. Update does not create: an id that is not yours is a 404."""
    from services.intake.fhir_api import read_json  # the FHIR router's body reader (parsed once, size-capped)

    try:
        document = await read_json(request)
        version = version_matched(if_match) if if_match is not None else None
    except UnreadableJson as exc:
        return unparseable(exc)
    except ValueError:
        return outcome_response(
            400,
            "invalid",
            [("If-Match", 'If-Match is the ETag a read answered, as W/"3"; nothing was changed')],
        )
    subscription_sent = isinstance(document, dict) and document.get("resourceType") == "Subscription"
    if subscription_sent and document.get("id") != subscription_id:
        return outcome_response(
            400,
            "invalid",
            [("Subscription.id", "the body's id must be the id in the URL (FHIR update sends the whole "
                                 "resource, id included); nothing was changed")],
        )  # fmt: skip
    wanted = await _checked(document, settings, UPDATE_STATUSES)
    if isinstance(wanted, Response):
        return wanted
    return await run_in_threadpool(
        _update, engine, settings, caller, subscription_id, version, wanted, document
    )


def _update(engine: Any, settings: Any, caller: Principal, subscription_id: str, version: int | None,
            wanted: subs.SubscriptionRequest, document: dict[str, Any]) -> Response:  # fmt: skip
    base = fhir_base(settings)
    with Session(engine, expire_on_commit=False) as session:
        # The partner's lock first, as a create takes it: turning one back on counts against its limit.
        transaction_lock(session, SUBSCRIPTION_LOCKS, str(caller.partner_id))
        found = owned(session, caller, subscription_id, lock=True)
        if found is None:
            return outcome_response(
                404,
                "not-found",
                [("Subscription.id", "no Subscription with this id is visible to this key, and update does not "
                                     "create one: POST [base]/Subscription creates a Subscription (its id is "
                                     "ours)")],
            )  # fmt: skip
        subscription, endpoint = found
        if version is not None and version != subscription.version_id:
            return outcome_response(
                412,
                "conflict",
                [(None, f"the Subscription is at version {subscription.version_id}, not {version} (If-Match): it "
                        "changed since you read it; read it again, make your change, and send it with the new "
                        "ETag; nothing was changed")],
            )  # fmt: skip
        try:
            apply_update(
                session,
                base,
                subscription,
                endpoint,
                wanted,
                document,
                settings.fhir_subscriptions_per_partner,
            )
        except UpdateRefused as exc:
            return outcome_response(exc.status, exc.code, exc.issues)
        except FhirInvalid as exc:
            return outcome_response(422, "invalid", [(i.expression, i.diagnostics) for i in exc.issues])
        session.commit()
        status, error = subs.current_status(session, subscription, endpoint)
        resource = subs.as_resource(base, subscription, status, error)
    headers = {"ETag": etag(resource), "Location": f"{base}/Subscription/{subscription_id}/_history/"
                                                   f"{subscription.version_id}"}  # fmt: skip
    return JSONResponse(resource, media_type=FHIR_JSON, headers=headers)


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
        found = owned(session, caller, subscription_id, lock=True)  # an update under way ends first
        if found is None:
            return not_found()
        subscription, endpoint = found
        if subscription.status != "off":
            pending = pending_deliveries(session, subscription_id)
            turn_off(session, subscription, endpoint, pending, "the Subscription was deleted")
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
        responses={
            200: {
                **_doc("your Subscription, its status now", SUBSCRIPTION_EXAMPLE),
                "headers": {"ETag": {"description": 'the version, W/"n"', "schema": {"type": "string"}}},
            },
            **ERRORS,
        },
    )
    updated = {**SUBSCRIPTION_EXAMPLE, "id": "2f0c…", "meta": {"versionId": "2"}}
    versioned = {
        "ETag": {"description": 'the version, W/"n"', "schema": {"type": "string"}},
        "Location": {"description": "[base]/Subscription/{id}/_history/{n}", "schema": {"type": "string"}},
    }
    router.add_api_route(
        "/Subscription/{subscription_id}",
        update_subscription,
        methods=["PUT"],
        responses={
            200: {
                **_doc(
                    "the Subscription as updated, meta.versionId one more (the same if nothing changed)",
                    updated,
                ),
                "headers": versioned,
            },
            **UPDATE_ERRORS,
        },  # fmt: skip
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {FHIR_JSON: {"schema": {"type": "object"}, "example": updated}},
            }
        },
    )
    router.add_api_route(
        "/Subscription/{subscription_id}",
        delete_subscription,
        methods=["DELETE"],
        responses={200: _outcome_doc("turned off", outcome("informational", [(None, "off")])), **ERRORS},
    )
