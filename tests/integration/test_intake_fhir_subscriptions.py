"""FHIR Subscriptions (R5 Backport on R4) against a local rest-hook receiver, on the real PostgreSQL: the
handshake, event notifications numbered per subscription, id-only and full-resource payloads, a failing
receiver getting its notifications in order once it recovers, partner scoping, refused endpoints, fhirpy."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.parameters import Parameters
from fhirpy.base.exceptions import ResourceNotFound
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import new_event
from contracts.events import ReportReady
from contracts.models import CaseStatus
from services.common.config import get_settings
from services.intake import api, fhir_api, fhir_subscriptions, webhooks_out_api
from services.intake.fhir_service_request import fhir_base
from services.intake.webhooks_out import WebhookDispatcher
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner
from tests.integration.test_intake_fhir_client import Served, served  # noqa: F401 - the module's fixture
from tests.integration.test_intake_outbound_webhooks import (
    Receiver,
    dispatch_until,
    publish,
    status_changed,
)

FHIR = {"Content-Type": "application/fhir+json"}
BACKPORT = fhir_subscriptions.BACKPORT


@pytest.fixture(scope="module")
def engines(settings: Any) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, fhir_api.router, webhooks_out_api.router)) as c:
        yield c


@pytest.fixture
def hook() -> Iterator[Receiver]:
    """The partner's rest-hook endpoint on loopback (answers 200 unless scripted)."""
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def dispatcher(engines: tuple[Engine, Engine]) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(
        engine=engines[0],
        auth_engine=engines[1],
        env="dev",
        base_delay=0.05,
        max_delay=0.3,
        rng=random.Random(3),
    )
    yield d
    d.close()


def base() -> str:
    return fhir_base(get_settings())


def subscription(
    url: str, topic: str = "case-status", content: str = "id-only", **more: Any
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": url,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": content}]},
        "header": ["Authorization: Bearer receiver-token"],
    }
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "follow our second opinions",
        "criteria": f"{base()}/SubscriptionTopic/{topic}",
        "channel": channel,
    }
    if "statuses" in more:
        resource["_criteria"] = {
            "extension": [
                {
                    "url": BACKPORT + "backport-filter-criteria",
                    "valueString": f"Task?status={more['statuses']}",
                }
            ]
        }
    if "heartbeat" in more:
        channel["extension"] = [
            {"url": BACKPORT + "backport-heartbeat-period", "valueUnsignedInt": more["heartbeat"]}
        ]
    return resource


def setup(client: TestClient, auth: Engine, resource: dict[str, Any]) -> tuple[dict[str, str], str, str]:
    """A partner with a case and a subscription: (the partner, subscription id, case id)."""
    partner = new_partner(auth, "Subscribed Hospital")
    headers = {"Authorization": partner["Authorization"]}
    case_id = client.post("/v1/cases", json=SAMPLE, headers=headers).json()["case_id"]
    created = client.post("/fhir/Subscription", json=resource, headers={**headers, **FHIR})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "requested"
    assert created.headers["location"].startswith(f"{base()}/Subscription/{created.json()['id']}")
    return partner, created.json()["id"], case_id


def bundles(hook: Receiver) -> list[dict[str, Any]]:
    return [json.loads(body) for _, _, body in hook.received]


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The SubscriptionStatus parameters as {name: value} (notification-event's parts as a dict)."""
    assert bundle["type"] == "history" and bundle["entry"][0]["resource"]["resourceType"] == "Parameters"
    Bundle.model_validate(bundle)
    Parameters.model_validate(bundle["entry"][0]["resource"])
    found: dict[str, Any] = {}
    for p in bundle["entry"][0]["resource"]["parameter"]:
        if p["name"] == "notification-event":
            found["event"] = {
                part["name"]: next(v for k, v in part.items() if k.startswith("value")) for part in p["part"]
            }
        else:
            found[p["name"]] = next(v for k, v in p.items() if k.startswith("value"))
    return found


def test_handshake_then_numbered_id_only_notifications_with_the_task_as_focus(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url))
    headers = {"Authorization": partner["Authorization"]}
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)
    _, sent_headers, _ = hook.received[0]
    assert sent_headers["content-type"] == "application/fhir+json"
    assert sent_headers["authorization"] == "Bearer receiver-token"  # channel.header
    shake = status_of(bundles(hook)[0])
    assert shake["type"] == "handshake" and shake["events-since-subscription-start"] == "0"
    assert shake["subscription"]["reference"] == f"{base()}/Subscription/{sub_id}"
    assert shake["topic"] == f"{base()}/SubscriptionTopic/case-status"
    read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()
    assert read["status"] == "active"
    assert read["channel"]["header"] == ["Authorization: (not shown)"]
    # A subscription's channel is not one of the partner's webhook endpoints.
    assert client.get(f"/v1/partners/{partner['partner_id']}/webhook-endpoints", headers=headers).json() == []

    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:1")
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:2")
    again = new_event(
        id=f"wf:{case_id}:2", source="/workflows/case", subject=case_id,
        data=status_changed(case_id, CaseStatus.MATCHING),
    )  # fmt: skip
    with Session(engines[0]) as session:  # a redelivered event: its notification is queued already
        assert fhir_subscriptions.notify(session, again, base()) == 0
        session.commit()
    dispatch_until(dispatcher, lambda: len(hook.received) == 3)
    dispatcher.run_once()
    assert len(hook.received) == 3  # the event applied again is neither numbered nor sent again
    first, second = bundles(hook)[1:]
    for number, bundle in ((1, first), (2, second)):
        status = status_of(bundle)
        assert status["type"] == "event-notification" and status["event"]["event-number"] == str(number)
        assert status["events-since-subscription-start"] == str(number)
        assert status["event"]["focus"]["reference"] == f"{base()}/Task/{case_id}"
        [_, focus] = bundle["entry"]
        assert focus["fullUrl"] == f"{base()}/Task/{case_id}" and "resource" not in focus  # id-only
    assert "Jane" not in json.dumps(bundles(hook)) and "MRN-0042" not in json.dumps(bundles(hook))

    answered = client.get(f"/fhir/Subscription/{sub_id}/$status", headers=headers)
    assert answered.status_code == 200
    parameters = answered.json()["entry"][0]["resource"]
    Parameters.model_validate(parameters)
    said = {
        p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in parameters["parameter"]
    }
    assert said["status"] == "active" and said["events-since-subscription-start"] == "2"
    assert said["type"] == "query-status"


def test_full_resource_carries_the_task_and_the_filter_keeps_the_statuses_asked_for(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(
        client, engines[1], subscription(hook.url, content="full-resource", statuses="completed")
    )
    publish(
        engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:r"
    )  # in-progress
    publish(
        engines[0], case_id, status_changed(case_id, CaseStatus.DELIVERED), f"wf:{case_id}:d"
    )  # completed
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)
    dispatcher.run_once()
    assert len(hook.received) == 2  # the handshake and the one status asked for
    bundle = bundles(hook)[1]
    assert status_of(bundle)["event"]["event-number"] == "1"
    [_, focus] = bundle["entry"]
    assert focus["resource"]["resourceType"] == "Task" and focus["resource"]["id"] == case_id
    assert focus["resource"]["status"] == "completed"
    assert focus["resource"]["businessStatus"]["coding"][0]["code"] == "delivered"

    # report-ready: the Task and the DiagnosticReport's URL.
    _, report_sub, _ = setup_same_partner(
        client, partner, subscription(hook.url, topic="report-ready", content="full-resource")
    )
    report_url = "https://fhir.example.org/fhir/DiagnosticReport/r-1"
    ready = ReportReady(
        case_id=case_id, report_id="r-1", pdf_url="https://x/r.pdf", fhir_url=report_url, sha256="0" * 64
    )
    publish(engines[0], case_id, ready, f"wf:{case_id}:ready")
    dispatch_until(dispatcher, lambda: len(hook.received) == 4)
    notified = bundles(hook)[3]
    status = status_of(notified)
    assert status["topic"] == f"{base()}/SubscriptionTopic/report-ready"
    assert status["event"]["additional-context"]["reference"] == report_url
    assert [e["fullUrl"] for e in notified["entry"][1:]] == [f"{base()}/Task/{case_id}", report_url]
    assert report_sub != sub_id


def setup_same_partner(
    client: TestClient, partner: dict[str, str], resource: dict[str, Any]
) -> tuple[None, str, None]:
    headers = {"Authorization": partner["Authorization"], **FHIR}
    created = client.post("/fhir/Subscription", json=resource, headers=headers)
    assert created.status_code == 201, created.text
    return None, created.json()["id"], None


def test_a_failing_receiver_gets_the_notifications_in_order_once_it_recovers(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url))
    headers = {"Authorization": partner["Authorization"]}
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)  # the handshake, answered 200
    hook.script = [(500, {}), (503, {})]
    for n, status in enumerate((CaseStatus.AWAITING_RECORDS, CaseStatus.MATCHING, CaseStatus.IN_REVIEW)):
        publish(engines[0], case_id, status_changed(case_id, status), f"wf:{case_id}:o{n}")
    dispatch_until(dispatcher, lambda: len(hook.received) == 3)  # two failed attempts
    read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()
    assert read["status"] == "error" and "503" in read["error"]
    dispatch_until(dispatcher, lambda: len(hook.received) == 6)
    numbers = [status_of(b)["event"]["event-number"] for b in bundles(hook)[1:]]
    assert numbers == ["1", "1", "1", "2", "3"]  # no later event before the earlier one was delivered
    assert client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()["status"] == "active"


def test_another_partner_cannot_read_search_or_delete_it_and_delete_turns_it_off(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url))
    headers = {"Authorization": partner["Authorization"]}
    other = {"Authorization": new_partner(engines[1], "Other Hospital")["Authorization"]}
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/$status")):
        answered = client.request(method, f"/fhir/Subscription/{sub_id}{path}", headers=other)
        assert answered.status_code == 404, (method, path)
        assert answered.json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Subscription", headers=other).json()["total"] == 0
    assert client.get("/fhir/Subscription?status=requested", headers=headers).json()["total"] == 1

    deleted = client.delete(f"/fhir/Subscription/{sub_id}", headers=headers)
    assert deleted.status_code == 200
    assert client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()["status"] == "off"
    off = client.get("/fhir/Subscription?status=off", headers=headers).json()
    assert [e["resource"]["id"] for e in off["entry"]] == [sub_id]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:off")
    dispatcher.run_once()
    assert hook.received == []  # the handshake was withdrawn with it, and nothing more is sent


@pytest.mark.parametrize(
    ("change", "element", "said"),
    [
        ({"channel.endpoint": "https://10.1.2.3/hook"}, "Subscription.channel.endpoint", "private"),
        ({"channel.endpoint": "ftp://ehr.example.org/x"}, "Subscription.channel.endpoint", "https"),
        (
            {"criteria": "https://elsewhere.example/SubscriptionTopic/admission"},
            "Subscription.criteria",
            "topic",
        ),
        ({"channel.type": "websocket"}, "Subscription.channel.type", "rest-hook"),
        ({"channel.header": ["Host: evil.example"]}, "Subscription.channel.header[0]", "Name: value"),
        ({"status": "active"}, "Subscription.status", "requested"),
    ],
)
def test_what_cannot_be_served_is_refused_naming_the_element(
    client: TestClient, engines: tuple[Engine, Engine], change: dict[str, Any], element: str, said: str
) -> None:
    headers = {"Authorization": new_partner(engines[1], "Refused Hospital")["Authorization"], **FHIR}
    resource = subscription("http://127.0.0.1:9/hook")
    for path, value in change.items():
        *parents, last = path.split(".")
        target = resource
        for name in parents:
            target = target[name]
        target[last] = value
    answered = client.post("/fhir/Subscription", json=resource, headers=headers)
    assert answered.status_code == 422, answered.text
    [issue] = answered.json()["issue"]
    assert issue["expression"] == [element] and said in issue["diagnostics"]


def test_filter_other_than_task_status_is_refused_and_the_partner_limit_holds(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    headers = {"Authorization": new_partner(engines[1], "Limited Hospital")["Authorization"], **FHIR}
    resource = subscription("http://127.0.0.1:9/hook")
    resource["_criteria"] = {
        "extension": [{"url": BACKPORT + "backport-filter-criteria", "valueString": "Patient?name=x"}]
    }
    answered = client.post("/fhir/Subscription", json=resource, headers=headers)
    assert answered.status_code == 422 and "Task?status=" in answered.text
    limited = get_settings().model_copy(update={"fhir_subscriptions_per_partner": 1})
    client.app.dependency_overrides[api.settings_dep] = lambda: limited  # type: ignore[attr-defined]
    try:
        assert (
            client.post(
                "/fhir/Subscription", json=subscription("http://127.0.0.1:9/a"), headers=headers
            ).status_code
            == 201
        )
        refused = client.post(
            "/fhir/Subscription", json=subscription("http://127.0.0.1:9/b"), headers=headers
        )
        assert refused.status_code == 409 and refused.json()["issue"][0]["code"] == "conflict"
    finally:
        client.app.dependency_overrides.pop(api.settings_dep)  # type: ignore[attr-defined]


def test_heartbeats_go_out_when_nothing_else_did_within_the_period(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    setup(client, engines[1], subscription(hook.url, heartbeat=60))
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)
    now = datetime.now(UTC)
    assert fhir_subscriptions.queue_heartbeats(engines[0], base(), now) == 0  # the handshake just went
    assert fhir_subscriptions.queue_heartbeats(engines[0], base(), now + timedelta(seconds=61)) >= 1
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)
    assert status_of(bundles(hook)[1])["type"] == "heartbeat"


def test_capability_statement_declares_subscription_and_its_topics(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    [declared] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    assert {i["code"] for i in declared["interaction"]} >= {
        "create",
        "read",
        "update",
        "search-type",
        "delete",
    }
    assert declared["versioning"] == "versioned-update" and declared["updateCreate"] is False
    topics = {
        e["valueCanonical"] for e in declared["extension"] if e["url"] == fhir_subscriptions.TOPIC_CANONICAL
    }
    assert topics == {f"{base()}/SubscriptionTopic/case-status", f"{base()}/SubscriptionTopic/report-ready"}


def test_fhirpy_creates_and_reads_a_subscription(served: Served) -> None:  # noqa: F811 - the imported fixture
    fhir = served.client()
    resource = subscription("http://127.0.0.1:9/fhirpy")
    resource["criteria"] = f"{served.base}/SubscriptionTopic/case-status"
    created = fhir.resource("Subscription", **{k: v for k, v in resource.items() if k != "resourceType"})
    created.save()
    assert created["id"] and created["status"] == "requested"
    read = fhir.reference("Subscription", created["id"]).to_resource()
    assert read["criteria"] == resource["criteria"] and read["status"] in ("requested", "error")
    with pytest.raises(ResourceNotFound):
        served_other = served.client()
        served_other.authorization = new_partner(served.auth, "fhirpy other")["Authorization"]
        served_other.reference("Subscription", created["id"]).to_resource()


def test_an_event_raised_while_an_earlier_one_waits_for_its_retry_waits_behind_it(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    _, _, case_id = setup(client, engines[1], subscription(hook.url))
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)  # the handshake
    hook.script = [(503, {"Retry-After": "2"})]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:w1")
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)  # event 1 refused: retried in 2 s
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:w2")
    dispatcher.run_once()
    assert len(hook.received) == 2  # event 2 is due, but waits for event 1
    dispatch_until(dispatcher, lambda: len(hook.received) == 4)
    assert [status_of(b)["event"]["event-number"] for b in bundles(hook)[1:]] == ["1", "1", "2"]


def test_an_interaction_not_served_is_a_405_naming_those_that_are(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    headers = {"Authorization": new_partner(engines[1], "Updating Hospital")["Authorization"], **FHIR}
    answered = client.patch(
        "/fhir/Subscription/some-id", json={"resourceType": "Subscription"}, headers=headers
    )
    assert answered.status_code == 405 and answered.json()["resourceType"] == "OperationOutcome"
    assert set(answered.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    said = answered.json()["issue"][0]["diagnostics"]
    assert (
        "delete (DELETE [base]/Subscription/{id})" in said and "update (PUT [base]/Subscription/{id})" in said
    )
