"""Outbound webhooks against a local HTTP receiver that fails, then succeeds; on the real PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import CaseStatusChanged, DeliverReport, new_event
from contracts.events import CaseCancelled, RecordsNeeded, ReportReady
from contracts.models import CaseStatus
from services.auth.models import Partner
from services.auth.partners import rotate_webhook_secret
from services.common.config import Settings
from services.intake import api, consumer, webhooks_out, webhooks_out_api
from services.intake.models import Case, CaseTimelineEntry, WebhookDelivery, WebhookEndpoint
from services.intake.webhook_signing import read_headers, verify
from services.intake.webhooks_out import WebhookDispatcher
from tests.infra import wait_until
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner


class Receiver:
    """A partner's endpoint on loopback: answers from a script, records what it got."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append(
                    (time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body)
                )
                code, headers = receiver.script.pop(0) if receiver.script else (200, {})
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, webhooks_out_api.router)) as c:
        yield c


@pytest.fixture
def dispatcher(engines: tuple[Engine, Engine]) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(
        engine=engines[0], auth_engine=engines[1], env="dev", base_delay=0.05, rng=random.Random(7)
    )
    yield d
    d.close()


def setup_partner(client: TestClient, auth: Engine, receiver: Receiver) -> tuple[dict[str, str], str, str]:
    partner = new_partner(auth, "Notified Clinic")
    headers = {"Authorization": partner["Authorization"]}
    endpoint = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints", json={"url": receiver.url}, headers=headers
    )
    assert endpoint.status_code == 201, endpoint.text
    case_id = client.post("/v1/cases", json=SAMPLE, headers=headers).json()["case_id"]
    return partner, endpoint.json()["endpoint_id"], case_id


def publish(engine: Engine, case_id: str, data: Any, event_id: str) -> None:
    event = new_event(id=event_id, source="/workflows/case", subject=case_id, data=data)
    with Session(engine) as session:
        consumer.handle(session, event)
        session.commit()


def dispatch_until(dispatcher: WebhookDispatcher, done: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the delivery did not finish in time"
        dispatcher.run_once()
        time.sleep(0.02)


def status_changed(case_id: str, status: CaseStatus) -> CaseStatusChanged:
    return CaseStatusChanged(case_id=case_id, status=status, previous=CaseStatus.INTAKE, at=datetime.now(UTC))


def test_retries_with_backoff_honour_retry_after_keep_the_webhook_id_and_are_logged(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    receiver.script = [(503, {"Retry-After": "1"}), (500, {}), (200, {})]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:s1")

    dispatch_until(dispatcher, lambda: len(receiver.received) == 3)
    (t1, h1, body), (t2, h2, _), (_, h3, _) = receiver.received
    assert t2 - t1 >= 0.95  # Retry-After: 1 was honoured
    assert h1["webhook-id"] == h2["webhook-id"] == h3["webhook-id"]
    with Session(engines[1]) as session:
        row = session.get(Partner, partner["partner_id"])
        assert row is not None
        verify([row.webhook_secret], read_headers(h3, time.time()), body)  # signed per Standard Webhooks
    payload = json.loads(body)
    assert payload["type"] == "case.status_changed"
    assert payload["data"]["status"] == "awaiting_records" and payload["data"]["case_id"] == case_id
    assert "Jane" not in body.decode() and "MRN-0042" not in body.decode()

    log = client.get(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries", headers=headers
    )
    [delivery] = log.json()
    assert delivery["status"] == "delivered" and delivery["webhook_id"] == h1["webhook-id"]
    assert [a["status_code"] for a in delivery["history"]] == [503, 500, 200]

    replayed = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries/{delivery['webhook_id']}/replay",
        headers=headers,
    )
    assert replayed.status_code == 200 and replayed.json()["status"] == "pending"
    dispatch_until(dispatcher, lambda: len(receiver.received) == 4)
    assert receiver.received[3][1]["webhook-id"] == h1["webhook-id"]

    again = new_event(
        id=f"wf:{case_id}:s1", source="/workflows/case", subject=case_id,
        data=status_changed(case_id, CaseStatus.AWAITING_RECORDS),
    )  # fmt: skip
    with Session(engines[0]) as session:  # a redelivered event queues nothing new
        webhooks_out.fan_out(session, again)
        session.commit()
    dispatcher.run_once()
    assert len(receiver.received) == 4


def test_410_disables_the_endpoint_and_nothing_more_is_sent(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    receiver.script = [(410, {})]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:g1")
    dispatch_until(dispatcher, lambda: len(receiver.received) == 1)
    [endpoint] = client.get(f"/v1/partners/{partner['partner_id']}/webhook-endpoints", headers=headers).json()
    assert endpoint["enabled"] is False and "410" in endpoint["disabled_reason"]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:g2")
    dispatcher.run_once()
    assert len(receiver.received) == 1
    case = client.get(f"/v1/cases/{case_id}", headers=headers).json()
    [alert] = [t for t in case["timeline"] if t["kind"] == "alert"]
    assert alert["detail"].startswith("webhook_delivery_failed: case.status_changed did not reach")
    assert f"webhook endpoint {endpoint_id} (it answered 410 Gone and was disabled" in alert["detail"]
    enabled = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/enable", headers=headers
    )
    assert enabled.json()["enabled"] is True


def test_cancellation_withdraws_pending_records_reminders(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver
) -> None:
    _, _, case_id = setup_partner(client, engines[1], receiver)
    publish(
        engines[0], case_id, RecordsNeeded(case_id=case_id, attempt=1, missing=["report"]), f"wf:{case_id}:n1"
    )
    publish(
        engines[0],
        case_id,
        CaseCancelled(case_id=case_id, reason="withdrawn", cancelled_by="key:x"),
        f"wf:{case_id}:c",
    )
    with Session(engines[0]) as session:
        rows = session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all()
    assert [(r.event_type, r.status) for r in rows] == [("records.needed", "cancelled")]


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.8/hook",
        "http://169.254.169.254/latest",
        "http://192.168.1.4/x",
        "ftp://127.0.0.1/x",
        "http://[fe80::1]/x",
    ],
)
def test_private_and_link_local_endpoints_are_refused(
    client: TestClient, engines: tuple[Engine, Engine], url: str
) -> None:
    partner = new_partner(engines[1], "Sneaky")
    response = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": url},
        headers={"Authorization": partner["Authorization"]},
    )
    assert response.status_code == 422, response.text


def test_another_partners_endpoints_are_404(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver
) -> None:
    owner, endpoint_id, _ = setup_partner(client, engines[1], receiver)
    intruder = new_partner(engines[1], "Intruder")
    headers = {"Authorization": intruder["Authorization"]}
    base = f"/v1/partners/{owner['partner_id']}/webhook-endpoints"
    for method, path in [
        ("GET", base),
        ("POST", base),
        ("DELETE", f"{base}/{endpoint_id}"),
        ("POST", f"{base}/{endpoint_id}/enable"),
        ("GET", f"{base}/{endpoint_id}/deliveries"),
        ("POST", f"{base}/{endpoint_id}/deliveries/msg_x/replay"),
    ]:
        response = client.request(
            method, path, headers=headers, json={"url": receiver.url} if method == "POST" else None
        )
        assert response.status_code == 404, (method, path, response.text)


def test_a_woken_sender_delivers_at_once_not_at_its_next_pass(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
) -> None:
    _, _, case_id = setup_partner(client, engines[1], receiver)
    sender = threading.Thread(target=dispatcher.run_forever, kwargs={"interval": 60.0}, daemon=True)
    sender.start()
    try:
        time.sleep(0.3)  # its first pass is done: the next would come in a minute
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), "evt-woken")
        dispatcher.wake()  # what the intake consumer does after each commit
        deadline = time.monotonic() + 10
        while not any(b'"awaiting_records"' in body for _, _, body in receiver.received):
            assert time.monotonic() < deadline, "the woken sender did not deliver; it waited for its pass"
            time.sleep(0.02)
    finally:
        dispatcher.stop()
        sender.join(timeout=15)


def test_a_batch_is_sent_in_order_and_every_outcome_recorded(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    statuses = [CaseStatus.AWAITING_RECORDS, CaseStatus.MATCHING, CaseStatus.AWAITING_ACCEPTANCE]
    receiver.script = [(200, {}), (500, {}), (200, {})]
    for n, status_ in enumerate(statuses):
        publish(engines[0], case_id, status_changed(case_id, status_), f"wf:{case_id}:b{n}")

    assert dispatcher.run_once() == 3  # one pass: claimed, sent, recorded together
    sent = [json.loads(body)["data"]["status"] for _, _, body in receiver.received]
    assert sent == [s.value for s in statuses]
    log = client.get(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries",
        headers={"Authorization": partner["Authorization"]},
    ).json()
    outcome = {d["webhook_id"]: (d["status"], [a["status_code"] for a in d["history"]]) for d in log}
    ids = [headers["webhook-id"] for _, headers, _ in receiver.received]
    assert [outcome[i] for i in ids] == [("delivered", [200]), ("pending", [500]), ("delivered", [200])]


def test_a_slow_endpoint_does_not_hold_back_the_record_of_what_was_already_sent(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, case_id = setup_partner(client, engines[1], receiver)
    original_send = dispatcher._send
    delivered_before_second_send: list[int] = []

    def send(delivery: webhooks_out.Claimed, endpoint: Any) -> Any:
        if delivery.case_id == case_id and delivery.source_event_id.endswith(("s1", "s3")):
            with Session(engines[0]) as session:
                rows = session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all()
                delivered_before_second_send.append(sum(r.status == "delivered" for r in rows))
        return original_send(delivery, endpoint)

    monkeypatch.setattr(dispatcher, "_send", send)
    monkeypatch.setattr(webhooks_out, "RECORD_EVERY", 60.0)  # a quick batch: recorded at its end
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:s0")
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:s1")
    dispatcher.run_once()
    monkeypatch.setattr(webhooks_out, "RECORD_EVERY", 0.0)  # the first send took longer than this
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_ACCEPTANCE), f"wf:{case_id}:s2")
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:s3")
    dispatcher.run_once()

    assert delivered_before_second_send == [0, 3]


def test_a_rotated_webhook_secret_signs_deliveries_within_seconds(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    monkeypatch.setattr(webhooks_out, "SECRETS_TTL", 0.2)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:r1")
    dispatch_until(dispatcher, lambda: len(receiver.received) == 1)
    with Session(engines[1]) as session:  # what POST /v1/partners/{id}/webhook-secret/rotate does
        new_secret = rotate_webhook_secret(session, partner["partner_id"])
        session.commit()
    assert new_secret is not None

    time.sleep(0.3)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:r2")
    dispatch_until(dispatcher, lambda: len(receiver.received) == 2)
    _, headers, body = receiver.received[1]
    verify([new_secret], read_headers(headers, time.time()), body)  # the receiver's new secret checks it


def test_a_batch_of_status_events_in_one_transaction_reaches_every_endpoint_and_the_timeline(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver
) -> None:
    """As the consumer applies a batch: several events in one transaction, flushed at its commit. The
    partner's endpoints are read once per transaction; one registered later gets the next batch's events."""
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    statuses = [CaseStatus.AWAITING_RECORDS, CaseStatus.MATCHING, CaseStatus.AWAITING_ACCEPTANCE]
    endpoint_reads: list[str] = []

    def count_reads(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM webhook_endpoints" in statement:
            endpoint_reads.append(statement)

    sqlalchemy.event.listen(engines[0], "before_cursor_execute", count_reads)
    try:
        with Session(engines[0]) as session:
            for n, status_ in enumerate(statuses):
                event = new_event(
                    id=f"wf:{case_id}:batch{n}", source="/workflows/case", subject=case_id,
                    data=status_changed(case_id, status_),
                )  # fmt: skip
                consumer.handle(session, event)
            session.commit()
    finally:
        sqlalchemy.event.remove(engines[0], "before_cursor_execute", count_reads)
    assert len(endpoint_reads) == 1

    second = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": receiver.url + "/second"},
        headers={"Authorization": partner["Authorization"]},
    )
    assert second.status_code == 201, second.text
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:batch3")

    with Session(engines[0]) as session:
        deliveries = session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all()
        timeline = session.exec(select(CaseTimelineEntry).where(CaseTimelineEntry.case_id == case_id)).all()
        case = session.get(Case, case_id)
    by_endpoint = sorted((d.endpoint_id, json.loads(d.payload)["data"]["status"]) for d in deliveries)
    in_order = [*statuses, CaseStatus.IN_REVIEW]
    assert by_endpoint == sorted(
        [(endpoint_id, s.value) for s in in_order] + [(second.json()["endpoint_id"], "in_review")]
    )
    assert sorted(e.status for e in timeline if e.event_id.startswith(f"wf:{case_id}:batch")) == sorted(
        s.value for s in in_order
    )
    assert case is not None and case.status == CaseStatus.IN_REVIEW


def test_a_woken_sender_claims_once_for_a_few_deliveries_and_again_only_after_a_full_batch(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
) -> None:
    """A pass that claimed less than a batch took everything due: no empty claim follows it (nor the end of
    its lane). A full batch is followed by another claim at once, not at the next interval: for the other
    endpoints, and for this one's rest when its lane ends (each endpoint's deliveries go one at a time)."""
    with Session(
        engines[0]
    ) as session:  # earlier tests' retries to their receivers, gone, claim on their own
        session.execute(
            sqlalchemy.update(WebhookEndpoint)
            .where(col(WebhookEndpoint.disabled_at).is_(None))
            .values(disabled_at=datetime.now(UTC), disabled_reason="the test is over")
        )
        session.commit()
    _, _, case_id = setup_partner(client, engines[1], receiver)
    claims: list[str] = []

    def count_claims(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "SKIP LOCKED" in statement and "webhook_deliveries" in statement:  # the claim, not the record
            claims.append(statement)

    sender = threading.Thread(target=dispatcher.run_forever, kwargs={"interval": 60.0}, daemon=True)
    sender.start()
    sqlalchemy.event.listen(engines[0], "before_cursor_execute", count_claims)
    try:
        time.sleep(0.3)  # its first pass is done: the next would come in a minute
        claims.clear()
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), "evt-few")
        dispatcher.wake()
        wait_until(lambda: len(receiver.received) == 1, "the woken sender's delivery", timeout=10)
        time.sleep(0.3)
        assert len(claims) == 1

        more = webhooks_out.BATCH + 5
        for n in range(more):
            publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"evt-many-{n}")
        claims.clear()
        dispatcher.wake()
        # The interval is a minute: no waiting for it.
        wait_until(lambda: len(receiver.received) == 1 + more, "the woken sender's deliveries", timeout=10)
        time.sleep(0.3)
        # A full batch, one for the other endpoints at once (none due: this one's lane is still sending, unless
        # it has just ended, when that one takes the rest), then the rest when the lane ends.
        assert 2 <= len(claims) <= 3
    finally:
        sqlalchemy.event.remove(engines[0], "before_cursor_execute", count_claims)
        dispatcher.stop()
        sender.join(timeout=15)


def test_the_sender_on_sqlite_sends_in_order_leases_retries_and_stops_at_410(
    receiver: Receiver, tmp_path: Any
) -> None:
    """`make demo` keeps intake in a SQLite file: the sender claims there without UPDATE ... RETURNING."""
    sqlite = intake_engines(Settings(database_url=None, data_dir=tmp_path))
    assert sqlite[0].dialect.name == "sqlite"
    with TestClient(intake_app(sqlite, api.router, webhooks_out_api.router)) as local:
        _, endpoint_id, case_id = setup_partner(local, sqlite[1], receiver)
    dispatcher = WebhookDispatcher(
        engine=sqlite[0], auth_engine=sqlite[1], env="dev", base_delay=0.05, rng=random.Random(7)
    )
    statuses = [CaseStatus.AWAITING_RECORDS, CaseStatus.MATCHING, CaseStatus.AWAITING_ACCEPTANCE]
    receiver.script = [(200, {}), (503, {}), (200, {})]
    for n, status_ in enumerate(statuses):
        publish(sqlite[0], case_id, status_changed(case_id, status_), f"wf:{case_id}:q{n}")

    claimed = dispatcher._claim(webhooks_out.BATCH)
    assert [json.loads(d.payload)["data"]["status"] for d, _ in claimed] == [s.value for s in statuses]
    assert dispatcher._claim(webhooks_out.BATCH) == []  # leased: not claimed twice
    dispatcher._record([dispatcher._send(d, e) for d, e in claimed])
    sent = [json.loads(body)["data"]["status"] for _, _, body in receiver.received]
    assert sent == [s.value for s in statuses]

    receiver.script = [(410, {})]
    dispatch_until(dispatcher, lambda: len(receiver.received) == 4)  # the 503 retried: the endpoint is gone
    publish(sqlite[0], case_id, status_changed(case_id, CaseStatus.IN_REVIEW), f"wf:{case_id}:q3")
    assert dispatcher.run_once() == 0  # a disabled endpoint is sent nothing more (nor queued anything)
    with Session(sqlite[0]) as session:
        rows = session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all()
        endpoint = session.get(WebhookEndpoint, endpoint_id)
    by_status = {json.loads(r.payload)["data"]["status"]: (r.status, r.attempts) for r in rows}
    assert by_status == {
        "awaiting_records": ("delivered", 1),
        "matching": ("failed", 2),
        "awaiting_acceptance": ("delivered", 1),
    }
    assert endpoint is not None and endpoint.disabled_at is not None and "410" in endpoint.disabled_reason
    dispatcher.close()


def test_each_later_delivery_of_the_report_tells_the_partner_it_was_amended(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    # An EHR that filed version 1 must learn that an addendum made version 2 (and 3), or it keeps showing the
    # report without the correction. The first delivery is report.ready's; each later one is report.amended.
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    links = {"report_id": "rp1", "pdf_url": "http://r/pdf", "fhir_url": "http://r/fhir"}
    for n in (1, 2, 3):
        publish(engines[0], case_id, DeliverReport(case_id=case_id, **links), f"wf:{case_id}:deliver-{n}")
    publish(engines[0], case_id, DeliverReport(case_id=case_id, **links), f"wf:{case_id}:deliver-3")  # again

    dispatch_until(dispatcher, lambda: len(receiver.received) >= 2)
    dispatcher.run_once()
    bodies = [json.loads(body) for _, _, body in receiver.received]
    assert [b["type"] for b in bodies] == ["report.amended", "report.amended"]  # versions 2 and 3, once each
    assert bodies[0]["data"] == {"case_id": case_id, **links}
    assert len({headers["webhook-id"] for _, headers, _ in receiver.received}) == 2


def test_the_case_timeline_shows_the_report_webhook_taken_and_a_webhook_that_failed_for_good(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver
) -> None:
    """What an operations nurse reads on the case: the partner's system has the report, or a notice never got
    there (after every attempt), once, with what to do."""
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    quick = WebhookDispatcher(
        engine=engines[0],
        auth_engine=engines[1],
        env="dev",
        base_delay=0.01,
        max_delay=0.02,
        rng=random.Random(7),
    )
    try:
        receiver.script = [(500, {})] * webhooks_out.MAX_ATTEMPTS
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:f1")
        dispatch_until(quick, lambda: len(receiver.received) == webhooks_out.MAX_ATTEMPTS)
        ready = ReportReady(case_id=case_id, report_id="rp1", pdf_url="http://r/pdf", fhir_url="http://r/fhir",
                            sha256="0" * 64)  # fmt: skip
        publish(engines[0], case_id, ready, f"wf:{case_id}:ready")
        dispatch_until(quick, lambda: len(receiver.received) == webhooks_out.MAX_ATTEMPTS + 1)
        quick.run_once()

        timeline = client.get(f"/v1/cases/{case_id}", headers=headers).json()["timeline"]
        [alert] = [t for t in timeline if t["kind"] == "alert"]
        assert alert["detail"].startswith(
            f"webhook_delivery_failed: case.status_changed did not reach the partner's webhook endpoint {endpoint_id} "
            f"(after {webhooks_out.MAX_ATTEMPTS} attempts, last: "
        )
        assert "the partner can replay it" in alert["detail"]
        [delivery] = [t for t in timeline if t["kind"] == "delivery"]
        assert delivery["detail"].startswith(
            f"the partner's system told the report is ready (report.ready to its webhook endpoint {endpoint_id}, "
            "HTTP 200, webhook-id "
        )
        assert "Jane" not in json.dumps(timeline) and "http://r/pdf" not in json.dumps(timeline)

        # Replayed by the partner and failed again: still one alert.
        log = client.get(
            f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries",
            headers=headers,
        ).json()
        [failed] = [d for d in log if d["status"] == "failed"]
        receiver.script = [(500, {})] * webhooks_out.MAX_ATTEMPTS
        replayed = client.post(
            f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries/"
            f"{failed['webhook_id']}/replay",
            headers=headers,
        )
        assert replayed.status_code == 200, replayed.text
        sent = len(receiver.received)
        dispatch_until(quick, lambda: len(receiver.received) > sent)
        timeline = client.get(f"/v1/cases/{case_id}", headers=headers).json()["timeline"]
        assert len([t for t in timeline if t["kind"] == "alert"]) == 1
    finally:
        quick.close()
