"""FHIR update of a Subscription (`PUT [base]/Subscription/{id}`) against local rest-hook receivers, on the real
PostgreSQL: a new filter holds for the events after it, a new endpoint gets a handshake and what was pending,
off and back on keep the event numbers running, versions (meta.versionId, ETag, Location, If-Match 412),
what cannot change or be seen, two updates at once, and fhirpy's save() of a read Subscription."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from contracts.models import CaseStatus
from services.intake import api, fhir_api
from services.intake.fhir_subscriptions import FILTER_CRITERIA
from services.intake.webhooks_out import WebhookDispatcher
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import new_partner
from tests.integration.test_intake_fhir_client import Served, served  # noqa: F401 - the module's fixture
from tests.integration.test_intake_fhir_subscriptions import (
    FHIR,
    base,
    bundles,
    setup,
    status_of,
    subscription,
)
from tests.integration.test_intake_outbound_webhooks import (
    Receiver,
    dispatch_until,
    publish,
    status_changed,
)


@pytest.fixture(scope="module")
def engines(settings: Any) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, fhir_api.router)) as c:
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
        rng=random.Random(5),
    )
    yield d
    d.close()


def put(client: TestClient, partner: dict[str, str], sub_id: str, resource: dict[str, Any],
        if_match: str | None = None) -> Any:  # fmt: skip
    headers = {"Authorization": partner["Authorization"], **FHIR}
    if if_match is not None:
        headers["If-Match"] = if_match
    return client.put(f"/fhir/Subscription/{sub_id}", json={**resource, "id": sub_id}, headers=headers)


def kinds(receiver: Receiver) -> list[str]:
    """What the receiver got, in order: `handshake`, `heartbeat` or the event number."""
    said = [status_of(b) for b in bundles(receiver)]
    return [s["event"]["event-number"] if s["type"] == "event-notification" else s["type"] for s in said]


def test_a_new_filter_holds_for_the_events_after_it_and_each_change_is_a_new_version(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url, statuses="completed"))
    headers = {"Authorization": partner["Authorization"]}
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)  # the handshake
    read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers)
    assert read.headers["etag"] == 'W/"1"' and read.json()["meta"]["versionId"] == "1"

    publish(
        engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:f1"
    )  # in-progress
    updated = put(client, partner, sub_id, subscription(hook.url, statuses="in-progress"), if_match='W/"1"')
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2" and updated.headers["etag"] == 'W/"2"'
    assert updated.headers["location"] == f"{base()}/Subscription/{sub_id}/_history/2"
    assert updated.json()["_criteria"]["extension"][0]["valueString"] == "Task?status=in-progress"
    assert updated.json()["status"] == "active"  # the channel did not change: no new handshake

    publish(engines[0], case_id, status_changed(case_id, CaseStatus.COMPOSING_REPORT), f"wf:{case_id}:f2")
    publish(
        engines[0], case_id, status_changed(case_id, CaseStatus.DELIVERED), f"wf:{case_id}:f3"
    )  # completed
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)
    dispatcher.run_once()
    assert kinds(hook) == ["handshake", "1"]  # only the in-progress event after the update
    [_, focus] = bundles(hook)[1]["entry"]
    assert focus["fullUrl"] == f"{base()}/Task/{case_id}"

    read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers)
    assert read.headers["etag"] == 'W/"2"' and read.json()["meta"]["versionId"] == "2"
    searched = client.get("/fhir/Subscription", headers=headers).json()
    assert [e["resource"]["meta"]["versionId"] for e in searched["entry"]] == ["2"]

    stale = put(client, partner, sub_id, subscription(hook.url, statuses="completed"), if_match='W/"1"')
    assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"
    assert "version 2" in stale.json()["issue"][0]["diagnostics"]
    assert (
        client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()["_criteria"]
        == (updated.json()["_criteria"])
    )  # the stale update changed nothing
    # The same resource again changes nothing: 200, the version stays.
    again = put(client, partner, sub_id, read.json(), if_match='W/"2"')
    assert again.status_code == 200 and again.headers["etag"] == 'W/"2"'
    assert again.headers["location"].endswith("/_history/2")


def test_a_new_endpoint_gets_a_handshake_then_what_was_pending_and_later_events_and_the_old_one_nothing(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url))
    headers = {"Authorization": partner["Authorization"]}
    dispatch_until(dispatcher, lambda: len(hook.received) == 1)  # the handshake
    hook.script = [(503, {"Retry-After": "3600"})]  # the old endpoint is going away
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:e1")
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)  # event 1 refused: retried in an hour
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:e2")

    moved = Receiver()
    try:
        resource = subscription(moved.url)
        resource["channel"]["header"] = ["Authorization: Bearer new-token"]
        updated = put(client, partner, sub_id, resource)
        assert updated.status_code == 200, updated.text
        assert updated.json()["status"] == "requested"  # until the new endpoint answers its handshake
        assert updated.json()["channel"]["endpoint"] == moved.url
        assert updated.json()["channel"]["header"] == ["Authorization: (not shown)"]
        dispatch_until(dispatcher, lambda: len(moved.received) == 3)
        assert kinds(moved) == ["handshake", "1", "2"]  # the handshake first, then what was pending, in order
        assert all(h["authorization"] == "Bearer new-token" for _, h, _ in moved.received)
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:e3")
        dispatch_until(dispatcher, lambda: len(moved.received) == 4)
        dispatcher.run_once()
        assert kinds(moved) == ["handshake", "1", "2", "3"]
        assert len(hook.received) == 2  # the old endpoint got nothing after the update
        read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()
        assert read["status"] == "active" and read["meta"]["versionId"] == "2"
    finally:
        moved.close()


def test_off_by_update_then_back_on_with_requested_keeps_the_event_numbers_running(
    client: TestClient, engines: tuple[Engine, Engine], hook: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, sub_id, case_id = setup(client, engines[1], subscription(hook.url))
    headers = {"Authorization": partner["Authorization"]}
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:n1")
    dispatch_until(dispatcher, lambda: len(hook.received) == 2)  # the handshake, event 1

    read = client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()  # as a client reads it
    off = put(client, partner, sub_id, {**read, "status": "off"})
    assert off.status_code == 200 and off.json()["status"] == "off" and off.json()["meta"]["versionId"] == "2"
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:n2")
    dispatcher.run_once()
    assert len(hook.received) == 2  # nothing while off
    refused = put(client, partner, sub_id, {**read, "status": "active"})
    assert refused.status_code == 422 and "requested" in refused.json()["issue"][0]["diagnostics"]

    # Back on from the read resource: its header is shown masked, and sent back so it keeps its value.
    on = put(client, partner, sub_id, {**read, "status": "requested"}, if_match='W/"2"')
    assert on.status_code == 200, on.text
    assert on.json()["status"] == "requested" and on.json()["meta"]["versionId"] == "3"
    dispatch_until(dispatcher, lambda: len(hook.received) == 3)
    assert kinds(hook)[2] == "handshake" and hook.received[2][1]["authorization"] == "Bearer receiver-token"
    assert client.get(f"/fhir/Subscription/{sub_id}", headers=headers).json()["status"] == "active"
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:n3")
    dispatch_until(dispatcher, lambda: len(hook.received) == 4)
    assert kinds(hook) == ["handshake", "1", "handshake", "2"]  # numbered on from before it was off
    assert status_of(bundles(hook)[3])["events-since-subscription-start"] == "2"


def test_the_topic_cannot_change_the_id_must_match_and_update_neither_creates_nor_shows_anothers(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    partner, sub_id, _ = setup(client, engines[1], subscription("http://127.0.0.1:9/hook"))
    topic = put(client, partner, sub_id, subscription("http://127.0.0.1:9/hook", topic="report-ready"))
    assert topic.status_code == 422, topic.text
    [issue] = topic.json()["issue"]
    assert issue["expression"] == ["Subscription.criteria"] and "new Subscription" in issue["diagnostics"]

    headers = {"Authorization": partner["Authorization"], **FHIR}
    body = {**subscription("http://127.0.0.1:9/hook"), "id": "another-id"}
    mismatch = client.put(f"/fhir/Subscription/{sub_id}", json=body, headers=headers)
    assert mismatch.status_code == 400 and mismatch.json()["issue"][0]["expression"] == ["Subscription.id"]
    unreadable = put(client, partner, sub_id, subscription("http://127.0.0.1:9/hook"), if_match="version 1")
    assert unreadable.status_code == 400 and unreadable.json()["issue"][0]["expression"] == ["If-Match"]

    other = new_partner(engines[1], "Other Updating Hospital")
    for who, target in ((other, sub_id), (partner, "00000000-0000-0000-0000-000000000000")):
        answered = put(client, who, target, subscription("http://127.0.0.1:9/other"))
        assert answered.status_code == 404 and answered.json()["resourceType"] == "OperationOutcome"
        assert "does not create" in answered.json()["issue"][0]["diagnostics"]
    read = client.get(f"/fhir/Subscription/{sub_id}", headers={"Authorization": partner["Authorization"]})
    assert read.json()["channel"]["endpoint"] == "http://127.0.0.1:9/hook"  # another partner changed nothing
    assert read.json()["meta"]["versionId"] == "1"


def test_two_updates_at_once_neither_is_lost_and_fhirpy_saves_a_read_subscription(
    served: Served,  # noqa: F811 - the imported fixture
) -> None:
    fhir = served.client()
    resource = subscription("http://127.0.0.1:9/fhirpy")
    resource["criteria"] = f"{served.base}/SubscriptionTopic/case-status"
    created = fhir.resource("Subscription", **{k: v for k, v in resource.items() if k != "resourceType"})
    created.save()

    read = fhir.reference("Subscription", created["id"]).to_resource()
    read["reason"] = "follow our second opinions, completed ones only"
    read["_criteria"] = {"extension": [{"url": FILTER_CRITERIA, "valueString": "Task?status=completed"}]}
    read.save()  # PUT of the resource as read: meta, status and the masked header sent back
    saved = fhir.reference("Subscription", created["id"]).to_resource()
    assert saved["meta"]["versionId"] == "2" and saved["reason"].endswith("completed ones only")
    assert saved["_criteria"]["extension"][0]["valueString"] == "Task?status=completed"

    url = f"{served.base}/Subscription/{created['id']}"

    def at_once(if_match: str | None) -> list[httpx.Response]:
        """Two updates sent together, each changing the reason."""
        answers: list[httpx.Response] = []
        start = threading.Barrier(2)
        headers = {
            "Authorization": served.authorization,
            **FHIR,
            **({"If-Match": if_match} if if_match else {}),
        }

        def update(n: int) -> None:
            body = json.dumps({**saved.serialize(), "reason": f"update {n} {if_match}"})
            start.wait()
            answers.append(httpx.put(url, content=body, headers=headers, timeout=30))

        threads = [threading.Thread(target=update, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    # Both read version 2: one update wins, the other is told its version is stale.
    assert sorted(a.status_code for a in at_once('W/"2"')) == [200, 412]
    # Without If-Match both go through, one after the other: each a version of its own, none lost.
    answers = at_once(None)
    assert sorted(int(a.json()["meta"]["versionId"]) for a in answers) == [4, 5]
    final = fhir.reference("Subscription", created["id"]).to_resource()
    assert final["meta"]["versionId"] == "5" and final["reason"] in {a.json()["reason"] for a in answers}
