"""Outbound webhooks against partner endpoints that misbehave: real sockets on loopback, the real sender."""

from __future__ import annotations

import contextlib
import email.utils
import json
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.models import CaseStatus
from services.common.config import Settings, get_settings
from services.common.db import transaction_lock
from services.intake import api, host_lookup, webhooks_out, webhooks_out_api
from services.intake.endpoint_connections import EndpointConnections
from services.intake.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from services.intake.webhooks_out import WebhookDispatcher
from services.intake.webhooks_out_api import ENDPOINT_LOCKS
from tests.infra import wait_until
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_outbound_webhooks import Receiver, publish, setup_partner, status_changed
from tests.pki import Authority

Behaviour = Callable[[socket.socket], None]


class RawEndpoint:
    """A partner's endpoint that reads the request, then does whatever `behaviour` does with the socket."""

    def __init__(
        self, behaviour: Behaviour, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.behaviour = behaviour
        self.tls = tls
        self.host = host
        self.requests = 0
        self.accepted = 0
        self.listener = socket.create_server(
            (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.listener.getsockname()[1]}/hook"

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        if self.tls:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()  # the sender refused the certificate
                return
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            with contextlib.suppress(OSError):  # the sender hung up
                self.behaviour(conn)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


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
        engine=engines[0],
        auth_engine=engines[1],
        env="dev",
        base_delay=0.05,
        timeout=1.0,
        rng=random.Random(7),
    )
    yield d
    d.close()


@pytest.fixture(autouse=True)
def nothing_left_due(engines: tuple[Engine, Engine]) -> Iterator[None]:
    """Endpoints are disabled before and after each test: the deliveries a test leaves due (released, held
    back, to dead endpoints) must not take a place in another test's batch (one database per session)."""
    disable_every_endpoint(engines[0])
    yield
    disable_every_endpoint(engines[0])


def disable_every_endpoint(engine: Engine) -> None:
    with Session(engine) as session:
        session.execute(
            update(WebhookEndpoint)
            .where(col(WebhookEndpoint.disabled_at).is_(None))
            .values(disabled_at=datetime.now(UTC), disabled_reason="the test is over")
        )
        session.commit()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def endpoints() -> Iterator[Callable[..., RawEndpoint]]:
    started: list[RawEndpoint] = []

    def start(
        behaviour: Behaviour, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> RawEndpoint:
        started.append(RawEndpoint(behaviour, tls, host))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


def deliveries_of(engine: Engine, case_id: str) -> list[WebhookDelivery]:
    with Session(engine) as session:
        return list(session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all())


def attempts_of(engine: Engine, delivery_id: str) -> list[WebhookAttempt]:
    with Session(engine) as session:
        return list(
            session.exec(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)).all()
        )


@pytest.mark.parametrize("retry_after", ["99999999999999999999", "\u00b2", "9" * 5000])
def test_a_retry_after_no_clock_can_hold_is_capped_and_the_batch_is_still_recorded(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    retry_after: str,
) -> None:
    # One partner's absurd Retry-After once broke the record of the whole batch: every delivery in it,
    # other partners' too, was sent again after the lease, and again, without an attempt ever logged.
    _, _, case_id = setup_partner(client, engines[1], receiver)
    other = Receiver()
    try:
        _, _, other_case = setup_partner(client, engines[1], other)
        receiver.script = [(503, {"Retry-After": retry_after})]
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:ra")
        publish(
            engines[0], other_case, status_changed(other_case, CaseStatus.MATCHING), f"wf:{other_case}:ra"
        )
        dispatcher.run_once()
    finally:
        other.close()
    [refused] = deliveries_of(engines[0], case_id)
    [delivered] = deliveries_of(engines[0], other_case)
    assert (refused.status, refused.attempts, refused.last_status_code) == ("pending", 1, 503)
    assert refused.next_attempt_at is not None
    assert (delivered.status, delivered.attempts) == ("delivered", 1)


def drip_headers(conn: socket.socket) -> None:
    """A status line, then a header line a third of a second apart, for ever: each read gets a byte."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        time.sleep(0.3)
        conn.sendall(b"x-wait: 1\r\n")


def endless_body(conn: socket.socket) -> None:
    """200 at once, then a chunked body that never ends (a huge body, as far as the sender can tell)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    while True:
        conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        time.sleep(0.05)


def silence(conn: socket.socket) -> None:
    """Accepts the request and never answers."""
    time.sleep(30)


def run_once_within(dispatcher: WebhookDispatcher, seconds: float) -> float:
    """One pass of the sender in a thread; fail if it takes longer than `seconds` (the thread is left)."""
    started = time.monotonic()
    sender = threading.Thread(target=dispatcher.run_once, daemon=True)
    sender.start()
    sender.join(seconds)
    assert not sender.is_alive(), f"one pass of the sender took more than {seconds:g} s"
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("behaviour", "status", "code", "error"),
    [
        (drip_headers, "pending", None, "did not answer within 1 s"),
        (silence, "pending", None, "did not answer"),
        (endless_body, "delivered", 200, ""),
    ],
)
def test_an_endpoint_that_answers_slowly_or_endlessly_costs_one_timeout_and_is_logged(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    endpoints: Callable[..., RawEndpoint],
    behaviour: Behaviour,
    status: str,
    code: int | None,
    error: str,
) -> None:
    # The timeout (1 s here, 20 s in production) bounds each read; an endpoint that sends a byte now and then,
    # or a body without end, once held the sender (and every other partner's delivery) for as long as it liked.
    endpoint = endpoints(behaviour)
    receiver.close()
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    with Session(engines[0]) as session:
        row = session.exec(
            select(WebhookEndpoint).where(WebhookEndpoint.partner_id == partner["partner_id"])
        ).one()
        row.url = endpoint.url
        session.add(row)
        session.commit()
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:slow")

    took = run_once_within(dispatcher, 5.0)

    assert took < 3.0
    [delivery] = deliveries_of(engines[0], case_id)
    [attempt] = attempts_of(engines[0], delivery.id)
    assert (delivery.status, delivery.attempts, attempt.status_code) == (status, 1, code)
    assert error in attempt.error and "xxxx" not in attempt.error


def point_endpoint_at(engine: Engine, partner_id: str, url: str) -> None:
    with Session(engine) as session:
        row = session.exec(select(WebhookEndpoint).where(WebhookEndpoint.partner_id == partner_id)).one()
        row.url = url
        session.add(row)
        session.commit()


def test_a_host_name_that_turns_private_after_the_check_is_not_connected_to(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    endpoints: Callable[..., RawEndpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DNS rebinding: the partner's name server answers a public address to the check and loopback (or the
    # cloud's metadata address) to the connection that follows. The sender connects to what it checked.
    internal = endpoints(silence)
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(
        engines[0], partner["partner_id"], f"https://rebind.example:{internal.url.split(':')[2]}"
    )
    answers = iter(["93.184.216.34"])
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host != "rebind.example":
            return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    real_connect = socket.create_connection
    connected_to: list[str] = []

    def loopback_only(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        connected_to.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError("no traffic leaves this machine in tests")
        return real_connect(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", loopback_only)
    sender = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="production", timeout=1.0)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:dns")
    try:
        run_once_within(sender, 5.0)
    finally:
        sender.close()

    assert internal.accepted == 0 and connected_to == ["93.184.216.34"]  # the address that was checked
    [delivery] = deliveries_of(engines[0], case_id)
    assert (delivery.status, delivery.attempts) == ("pending", 1)


def answer(status: bytes, headers: bytes = b"") -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 " + status + b"\r\n" + headers + b"content-length: 0\r\n\r\n")

    return behaviour


def hang_up_mid_answer(conn: socket.socket) -> None:
    """Starts an answer, then closes the connection."""
    conn.sendall(b"HTTP/1.1 200 O")


def tls_server(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a certificate from a CA that no sender trusts (self-made)."""
    issued = Authority(tmp_path, "partner-own").issue("hooks", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    return context


@pytest.mark.parametrize(
    ("behaviour", "says"),
    [
        (answer(b"301 Moved Permanently", b"location: http://127.0.0.1:1/elsewhere\r\n"), "redirect"),
        (answer(b"302 Found", b"location: /other-path\r\n"), "redirect"),
        (answer(b"307 Temporary Redirect", b"location: /hook\r\n"), "redirect"),  # a loop
        (answer(b"308 Permanent Redirect", b"location: https://169.254.169.254/\r\n"), "redirect"),
        (hang_up_mid_answer, "closed the connection"),
        (None, "certificate"),
    ],
)
def test_each_failed_attempt_says_what_the_endpoint_did(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    endpoints: Callable[..., RawEndpoint],
    tmp_path: Path,
    behaviour: Behaviour | None,
    says: str,
) -> None:
    # The partner reads the delivery log to fix their side: a certificate we refuse is not "did not
    # answer", and a redirect (never followed: it could lead anywhere) needs the URL registered anew.
    endpoint = (
        endpoints(answer(b"200 OK"), tls_server(tmp_path)) if behaviour is None else endpoints(behaviour)
    )
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(engines[0], partner["partner_id"], endpoint.url)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:say")

    run_once_within(dispatcher, 5.0)

    [delivery] = deliveries_of(engines[0], case_id)
    [attempt] = attempts_of(engines[0], delivery.id)
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert says in attempt.error, attempt.error
    assert endpoint.accepted == 1 and len(receiver.received) == 0  # no redirect followed


def test_an_endpoint_with_a_certificate_the_sender_trusts_is_delivered_to_over_the_checked_address(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    endpoints: Callable[..., RawEndpoint],
    tmp_path: Path,
) -> None:
    # Connecting to the checked address keeps the certificate checked against the URL's host.
    authority = Authority(tmp_path, "public")
    issued = authority.issue("hooks", server=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(issued.cert, issued.key)
    endpoint = endpoints(answer(b"204 No Content"), server)
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(engines[0], partner["partner_id"], endpoint.url)
    dispatcher.close()
    dispatcher.connections = EndpointConnections(ssl.create_default_context(cafile=str(authority.cert)))
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:tls")

    run_once_within(dispatcher, 5.0)

    [delivery] = deliveries_of(engines[0], case_id)
    assert (delivery.status, delivery.last_status_code, endpoint.requests) == ("delivered", 204, 1)


def test_an_endpoint_that_does_not_answer_costs_one_timeout_a_pass_and_holds_up_no_other_partner(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    endpoints: Callable[..., RawEndpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sent one after another, four deliveries to a dead endpoint cost four timeouts (80 s in production):
    # longer than the lease (60 s), so another replica sent them again in parallel, and every other
    # partner's delivery in the batch waited behind them.
    monkeypatch.setattr(webhooks_out, "LEASE", timedelta(seconds=3))
    dead = endpoints(silence)
    stalled = Receiver()  # registered first: its deliveries are older, first in the batch
    try:
        stalled_partner, _, stalled_case = setup_partner(client, engines[1], stalled)
    finally:
        stalled.close()
    point_endpoint_at(engines[0], stalled_partner["partner_id"], dead.url)
    _, _, case_id = setup_partner(client, engines[1], receiver)
    statuses = [
        CaseStatus.AWAITING_RECORDS,
        CaseStatus.MATCHING,
        CaseStatus.AWAITING_ACCEPTANCE,
        CaseStatus.IN_REVIEW,
    ]
    for n, status_ in enumerate(statuses):
        publish(engines[0], stalled_case, status_changed(stalled_case, status_), f"wf:{stalled_case}:d{n}")
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:live")
    sender = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="dev", timeout=1.0)

    started = time.monotonic()
    try:
        took = run_once_within(sender, 10.0)
    finally:
        sender.close()

    assert receiver.received and receiver.received[0][0] - started < 0.9  # not behind the dead endpoint
    assert took < 3.0  # inside the lease: nothing of the batch can be claimed again meanwhile
    assert dead.requests == 1
    stalled_rows = sorted(deliveries_of(engines[0], stalled_case), key=lambda d: d.created_at)
    assert [(d.status, d.attempts) for d in stalled_rows] == [
        ("pending", 1),
        ("pending", 0),
        ("pending", 0),
        ("pending", 0),
    ]
    retry_at = stalled_rows[0].next_attempt_at
    assert retry_at is not None and all(d.next_attempt_at == retry_at for d in stalled_rows[1:])


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://[::1/hook", "not a valid URL"),
        ("http://127.0.0.1:abc/hook", "port"),
        ("http://127.0.0.1:99999/hook", "port"),
        ("http://127.0.0.1:0/hook", "port"),
        ("http://127.0.0.1/\x01hook", "not a valid URL"),
        ("http://" + "a" * 64 + ".example/hook", "host name"),  # a DNS label is 63 characters at most
        ("http://.example/hook", "host name"),
    ],
)
def test_a_url_no_request_can_be_sent_to_is_refused_at_registration_and_spoils_no_batch(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    url: str,
    says: str,
) -> None:
    # Such a URL passed the check (or failed it with a 500), then made httpx or the socket raise an error
    # the sender did not expect: the pass broke before its record, and every delivery in the batch, other
    # partners' too, was sent again after each lease, with no attempt ever logged.
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    refused = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": url},
        headers={"Authorization": partner["Authorization"]},
    )
    assert refused.status_code == 422 and says in refused.json()["detail"], refused.text

    other = Receiver()
    try:
        other_partner, _, other_case = setup_partner(client, engines[1], other)
        point_endpoint_at(engines[0], other_partner["partner_id"], url)  # registered before the check
        publish(engines[0], other_case, status_changed(other_case, CaseStatus.MATCHING), f"wf:{other_case}:u")
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:u")
        run_once_within(dispatcher, 5.0)
    finally:
        other.close()
    [bad] = deliveries_of(engines[0], other_case)
    [good] = deliveries_of(engines[0], case_id)
    assert (bad.status, bad.attempts) == ("pending", 1) and says in bad.last_error
    assert (good.status, good.attempts) == ("delivered", 1)


def test_a_replay_while_the_delivery_is_being_sent_does_not_send_it_twice_at_once(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    # The replay put the delivery due at once, lease or not: another replica claimed it while the first was
    # still sending it. A replay of a delivery whose attempt is running (or due within the lease) is that one.
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:rp")
    # This replica is sending it now (earlier tests may have left deliveries due: not this test's).
    [in_flight] = [d for d, _ in dispatcher._claim(webhooks_out.BATCH) if d.case_id == case_id]
    replica = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="dev")
    try:
        replayed = client.post(
            f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}/deliveries/{in_flight.id}/replay",
            headers={"Authorization": partner["Authorization"]},
        )
        assert replayed.status_code == 200 and replayed.json()["status"] == "pending"
        assert case_id not in [d.case_id for d, _ in replica._claim(webhooks_out.BATCH)]
    finally:
        replica.close()


def test_a_replay_to_a_disabled_endpoint_says_to_enable_it_first(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    base = f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}"
    receiver.script = [(410, {})]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:off")
    dispatcher.run_once()
    [delivery] = deliveries_of(engines[0], case_id)

    refused = client.post(f"{base}/deliveries/{delivery.id}/replay", headers=headers)

    assert refused.status_code == 409 and "enable" in refused.json()["detail"], refused.text
    assert deliveries_of(engines[0], case_id)[0].status == "failed"
    assert client.post(f"{base}/enable", headers=headers).status_code == 200
    assert client.post(f"{base}/deliveries/{delivery.id}/replay", headers=headers).status_code == 200
    dispatcher.run_once()
    assert len(receiver.received) == 2


def test_a_slow_but_answering_endpoint_is_sent_no_more_in_a_pass_than_fits_in_the_lease(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    endpoints: Callable[..., RawEndpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each answer comes inside the timeout, so none is held back; but twenty of them one after another
    # (up to 400 s in production) outlived the 60 s lease: another replica claimed the batch's rest and
    # sent it beside this one. A lane starts a send only while that send ends well inside the lease.
    monkeypatch.setattr(webhooks_out, "LEASE", timedelta(seconds=2))

    def slow_ok(conn: socket.socket) -> None:
        time.sleep(0.4)
        answer(b"200 OK")(conn)

    slow = endpoints(slow_ok)
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(engines[0], partner["partner_id"], slow.url)
    for n in range(8):
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:slow{n}")
    sender = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="dev", timeout=1.0)
    try:
        took = run_once_within(sender, 10.0)
        rows = deliveries_of(engines[0], case_id)
        assert took < 2.0  # inside the lease
        assert sorted((d.status, d.attempts) for d in rows) == sorted(
            [("delivered", 1)] * slow.requests + [("pending", 0)] * (8 - slow.requests)
        )
        now = datetime.now(UTC)
        assert 0 < slow.requests < 8
        assert all(d.next_attempt_at.replace(tzinfo=UTC) <= now for d in rows if d.status == "pending")
        while sender.run_once():  # the rest goes in the next passes, nothing lost
            pass
        assert slow.requests == 8
    finally:
        sender.close()


def test_an_ipv6_literal_endpoint_is_registered_and_delivered_to(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    endpoints: Callable[..., RawEndpoint],
) -> None:
    endpoint = endpoints(answer(b"204 No Content"), host="::1")
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    registered = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": endpoint.url},
        headers={"Authorization": partner["Authorization"]},
    )
    assert registered.status_code == 201, registered.text
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:v6")
    run_once_within(dispatcher, 5.0)
    assert endpoint.requests == 1 and len(receiver.received) == 1
    assert {d.status for d in deliveries_of(engines[0], case_id)} == {"delivered"}


def test_a_429_with_an_http_date_retry_after_is_retried_then(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    _, _, case_id = setup_partner(client, engines[1], receiver)
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    receiver.script = [(429, {"Retry-After": later})]
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:429")
    dispatcher.run_once()
    [delivery] = deliveries_of(engines[0], case_id)
    [attempt] = attempts_of(engines[0], delivery.id)
    wait = delivery.next_attempt_at.replace(tzinfo=UTC) - attempt.at.replace(tzinfo=UTC)
    assert (delivery.status, attempt.status_code) == ("pending", 429)
    assert timedelta(seconds=1.5) < wait <= timedelta(seconds=3)  # the date, not the 0.05 s backoff


def test_an_endpoint_deleted_while_its_delivery_is_in_flight_gets_nothing_more(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    endpoints: Callable[..., RawEndpoint],
) -> None:
    def slow_503(conn: socket.socket) -> None:
        time.sleep(0.5)
        answer(b"503 Service Unavailable")(conn)

    endpoint = endpoints(slow_503)
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(engines[0], partner["partner_id"], endpoint.url)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:del")
    sender = threading.Thread(target=dispatcher.run_once, daemon=True)
    sender.start()
    time.sleep(0.2)
    headers = {"Authorization": partner["Authorization"]}
    base = f"/v1/partners/{partner['partner_id']}/webhook-endpoints/{endpoint_id}"
    assert client.delete(base, headers=headers).status_code == 204
    sender.join(5)
    time.sleep(0.2)
    dispatcher.run_once()
    [delivery] = client.get(f"{base}/deliveries", headers=headers).json()
    assert endpoint.requests == 1
    assert (delivery["status"], [a["status_code"] for a in delivery["history"]]) == ("pending", [503])


def test_the_same_url_registered_twice_is_refused_not_sent_every_event_twice(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    # Each endpoint gets its own webhook-id for an event, so a URL registered twice (a registration retried
    # without an Idempotency-Key) received every event twice under two ids: no receiver could dedupe it.
    partner, endpoint_id, case_id = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    base = f"/v1/partners/{partner['partner_id']}/webhook-endpoints"
    for url in (receiver.url, receiver.url.replace("http://", "HTTP://")):  # the same target
        again = client.post(base, json={"url": url}, headers=headers)
        assert again.status_code == 409, again.text
        assert endpoint_id in again.json()["detail"] and "already" in again.json()["detail"]
    assert client.delete(f"{base}/{endpoint_id}", headers=headers).status_code == 204
    anew = client.post(base, json={"url": receiver.url}, headers=headers)  # a disabled one's URL: fine
    assert anew.status_code == 201, anew.text
    refused = client.post(f"{base}/{endpoint_id}/enable", headers=headers)  # but not both enabled
    assert refused.status_code == 409 and anew.json()["endpoint_id"] in refused.json()["detail"], refused.text

    keyed = {**headers, "Idempotency-Key": f"reg-{case_id}"}
    first = client.post(base, json={"url": receiver.url + "/other"}, headers=keyed)
    replay = client.post(base, json={"url": receiver.url + "/other"}, headers=keyed)
    assert (first.status_code, replay.status_code) == (201, 201) and replay.json() == first.json()


def test_two_registrations_of_one_url_at_once_take_turns_and_the_second_is_refused(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver
) -> None:
    """The check that a URL is not enabled twice and the insert are one turn per partner: a registration
    waits while another of the partner's is between them, then finds its URL taken (409), never both 201."""
    partner, _, _ = setup_partner(client, engines[1], receiver)
    headers = {"Authorization": partner["Authorization"]}
    base = f"/v1/partners/{partner['partner_id']}/webhook-endpoints"
    url = receiver.url + "/at-once"
    with Session(engines[0]) as other, ThreadPoolExecutor(1) as pool:
        # Another registration of the same URL, between its check and its commit: it holds the partner's turn.
        transaction_lock(other, ENDPOINT_LOCKS, partner["partner_id"])
        waiting = pool.submit(client.post, base, json={"url": url}, headers=headers)
        time.sleep(0.5)
        assert not waiting.done(), "the registration did not wait for the other one's turn"
        other.add(WebhookEndpoint(id=str(uuid.uuid4()), partner_id=partner["partner_id"], url=url))
        other.commit()
        second = waiting.result(timeout=10)
    assert second.status_code == 409, second.text
    assert "already registered" in second.json()["detail"]


def register(client: TestClient, partner: dict[str, str], url: str) -> httpx.Response:
    return client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": url},
        headers={"Authorization": partner["Authorization"]},
    )


def test_a_partner_has_at_most_the_limit_of_enabled_endpoints_and_is_told_what_to_do(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # There was no limit: a partner could register thousands of endpoints, each costing the sender a lane
    # and an attempt per event.
    monkeypatch.setattr(get_settings(), "webhook_endpoints_per_partner", 3)
    partner, first_id, _ = setup_partner(client, engines[1], receiver)  # one enabled endpoint
    base = f"/v1/partners/{partner['partner_id']}/webhook-endpoints"
    headers = {"Authorization": partner["Authorization"]}
    assert [register(client, partner, f"{receiver.url}/{n}").status_code for n in (1, 2)] == [201, 201]

    refused = register(client, partner, f"{receiver.url}/3")

    assert refused.status_code == 409, refused.text
    assert "already has 3 enabled webhook endpoints" in refused.json()["detail"]
    assert "DELETE one" in refused.json()["detail"]
    assert client.delete(f"{base}/{first_id}", headers=headers).status_code == 204
    assert register(client, partner, f"{receiver.url}/3").status_code == 201  # its place is free again
    again = client.post(f"{base}/{first_id}/enable", headers=headers)  # and taken: no fourth one enabled
    assert again.status_code == 409 and "already has 3" in again.json()["detail"], again.text
    enabled = [e for e in client.get(base, headers=headers).json() if e["enabled"]]
    assert len(enabled) == 3


def test_a_registration_waiting_for_the_partners_turn_counts_the_endpoint_registered_meanwhile(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is counted in the partner's turn: two registrations at once cannot both take the last place."""
    monkeypatch.setattr(get_settings(), "webhook_endpoints_per_partner", 2)
    partner, _, _ = setup_partner(client, engines[1], receiver)
    with Session(engines[0]) as other, ThreadPoolExecutor(1) as pool:
        # Another registration, between its count and its commit: it holds the partner's turn.
        transaction_lock(other, ENDPOINT_LOCKS, partner["partner_id"])
        waiting = pool.submit(register, client, partner, receiver.url + "/second")
        wait_until(lambda: waiting_for_advisory_lock(engines[0]), "the registration waiting for its turn")
        other.add(
            WebhookEndpoint(id=str(uuid.uuid4()), partner_id=partner["partner_id"], url=receiver.url + "/x")
        )
        other.commit()
        last = waiting.result(timeout=10)
    assert last.status_code == 409 and "already has 2 enabled" in last.json()["detail"], last.text


def waiting_for_advisory_lock(engine: Engine) -> bool:
    """Whether a session of this test's database waits for one of ENDPOINT_LOCKS' advisory locks."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = :space"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"space": ENDPOINT_LOCKS},
            ).scalar()
        )


def test_a_short_retry_after_does_not_use_up_three_days_of_retries_in_seconds(
    client: TestClient, engines: tuple[Engine, Engine], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    # A maintenance page answering 503 with Retry-After: 1 had all ten attempts made within ten seconds and
    # the delivery failed: the "down for maintenance misses nothing" promise broken. Retry-After is the
    # least wait; the schedule still spreads the attempts over three days.
    _, _, case_id = setup_partner(client, engines[1], receiver)
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:ra1")
    with Session(engines[0]) as session:
        [row] = session.exec(select(WebhookDelivery).where(WebhookDelivery.case_id == case_id)).all()
        row.attempts = 5  # five failures so far: the sixth wait is 10 h (scaled by the fixture's 0.01)
        session.add(row)
        session.commit()
    receiver.script = [(503, {"Retry-After": "1"})]
    dispatcher.run_once()
    [delivery] = deliveries_of(engines[0], case_id)
    [attempt] = attempts_of(engines[0], delivery.id)
    wait = delivery.next_attempt_at.replace(tzinfo=UTC) - attempt.at.replace(tzinfo=UTC)
    scheduled = webhooks_out.RETRY_SCHEDULE[5] * 0.05 / 5.0
    assert (delivery.status, delivery.attempts) == ("pending", 6)
    assert wait >= timedelta(seconds=0.8 * scheduled)


def test_a_fault_of_ours_in_one_send_costs_the_batch_nothing(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three escapes were found above (a Retry-After, a port, a host name); whatever the next one is, it
    # must cost its own delivery one attempt, not the batch's record: the other partners' deliveries, sent,
    # would otherwise be sent again after every lease with no attempt logged.
    _, _, case_id = setup_partner(client, engines[1], receiver)
    other = Receiver()
    try:
        _, _, other_case = setup_partner(client, engines[1], other)
        original = webhooks_out.check_url

        def faulty(url: str, env: str, resolve: object = None) -> list[str]:
            if url == other.url:
                raise RuntimeError("a defect of ours")
            return original(url, env)

        monkeypatch.setattr(webhooks_out, "check_url", faulty)
        publish(engines[0], other_case, status_changed(other_case, CaseStatus.MATCHING), f"wf:{other_case}:f")
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:f")
        run_once_within(dispatcher, 5.0)
    finally:
        other.close()
    [faulted] = deliveries_of(engines[0], other_case)
    [delivered] = deliveries_of(engines[0], case_id)
    assert (faulted.status, faulted.attempts) == ("pending", 1) and "RuntimeError" in faulted.last_error
    assert (delivered.status, delivered.attempts) == ("delivered", 1)


def test_many_dead_endpoints_of_one_partner_do_not_keep_a_pass_past_the_lease(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    endpoints: Callable[..., RawEndpoint],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More dead endpoints than lanes: the lanes that waited for a free one started their first send late,
    # and the pass ran past the lease (three rounds of 20 s in production) while its deliveries could be
    # claimed again. A lane that would end past the lease leaves its deliveries to the next pass.
    monkeypatch.setattr(webhooks_out, "LEASE", timedelta(seconds=2))
    monkeypatch.setattr(webhooks_out, "LANES", 2)
    dead = endpoints(silence)
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    for n in range(6):
        registered = client.post(
            f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
            json={"url": f"{dead.url}/{n}"},
            headers={"Authorization": partner["Authorization"]},
        )
        assert registered.status_code == 201, registered.text
    publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:many")
    sender = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="dev", timeout=1.0)
    try:
        took = run_once_within(sender, 10.0)
    finally:
        sender.close()
    rows = deliveries_of(engines[0], case_id)
    assert took < 2.0  # inside the lease
    assert len(rows) == 7 and dead.requests <= 2
    unsent = [d for d in rows if d.attempts == 0]
    assert unsent and all(d.status == "pending" for d in unsent)
    assert all(d.next_attempt_at.replace(tzinfo=UTC) <= datetime.now(UTC) for d in unsent)


@pytest.fixture
def hanging_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A host name whose DNS lookup never answers (until the test ends, or 6 s pass: a sender without a
    deadline of its own fails its test rather than hang the suite)."""
    host = "hangs.example"
    answered = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(name: object, port: object, *args: object, **kwargs: object) -> object:
        if name != host:
            return real_getaddrinfo(name, port, *args, **kwargs)  # type: ignore[arg-type]
        answered.wait(6)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield host
    answered.set()


def test_a_dns_lookup_that_never_answers_costs_the_attempt_its_timeout_and_says_so(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    dispatcher: WebhookDispatcher,
    hanging_resolver: str,
) -> None:
    # The lookup of the endpoint's host had no deadline: a name server that never answers held the lane,
    # the pass and every other partner's deliveries behind it, with nothing in the delivery log.
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    point_endpoint_at(engines[0], partner["partner_id"], f"http://{hanging_resolver}:9/hook")
    for n, status_ in enumerate([CaseStatus.AWAITING_RECORDS, CaseStatus.MATCHING]):
        publish(engines[0], case_id, status_changed(case_id, status_), f"wf:{case_id}:dns{n}")

    took = run_once_within(dispatcher, 3.0)

    assert took < 2.0
    first, second = sorted(deliveries_of(engines[0], case_id), key=lambda d: d.created_at)
    [attempt] = attempts_of(engines[0], first.id)
    assert attempt.error.startswith("the DNS lookup of the endpoint's host did not answer within 1 s")
    assert (first.status, first.attempts, attempt.status_code) == ("pending", 1, None)
    assert (second.status, second.attempts) == ("pending", 0)  # held back to the first one's retry
    assert second.next_attempt_at == first.next_attempt_at


SILENT_NAME_SERVER = """
import json, socket, time
from services.intake.host_lookup import EndpointRefused, resolve_host
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
silent.bind(("127.0.0.1", 53))  # the name server resolv.conf names here: it reads nothing, answers nothing
started = time.monotonic()
try:
    outcome = str(resolve_host("hooks.example", 0.5))
except EndpointRefused as exc:
    outcome = str(exc)
took = time.monotonic() - started
silent.setblocking(False)
print(json.dumps({"outcome": outcome, "took": took, "asked": len(silent.recv(512)) > 0}))
"""


def test_a_real_name_server_that_never_answers_costs_the_lookup_its_deadline(tmp_path: Path) -> None:
    """The system resolver asking a real name server (UDP on 127.0.0.1:53) that never answers: in a user,
    mount and network namespace of its own, with its own resolv.conf, so nothing of the machine's changes."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("unshare or ip is not installed")
    if subprocess.run(["unshare", "-rmn", "true"], capture_output=True, check=False).returncode:
        pytest.skip("user namespaces are not available here (the fixture hanging_resolver stands in)")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
    isolated = f'ip link set lo up && mount --bind {resolv} /etc/resolv.conf && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        ["unshare", "-rmn", "sh", "-c", isolated, SILENT_NAME_SERVER],
        cwd=Path(__file__).resolve().parents[2],  # this tree's services, not an installed copy's
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["asked"], "the resolver did not ask the silent name server"
    assert found["outcome"].startswith("the DNS lookup of the endpoint's host did not answer within 0.5 s")
    assert found["took"] < 1.5


def test_a_registration_whose_host_lookup_never_answers_is_refused_in_seconds(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    hanging_resolver: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host_lookup, "DNS_TIMEOUT", 0.5)
    partner, _, _ = setup_partner(client, engines[1], receiver)
    started = time.monotonic()
    refused = client.post(
        f"/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": f"http://{hanging_resolver}/hook"},
        headers={"Authorization": partner["Authorization"]},
    )
    assert time.monotonic() - started < 2.0
    assert refused.status_code == 422, refused.text
    assert "DNS lookup of the endpoint's host did not answer within 0.5 s" in refused.json()["detail"]


def test_a_slow_endpoint_holds_only_its_own_lane_and_another_gets_new_deliveries_at_once(
    client: TestClient,
    engines: tuple[Engine, Engine],
    receiver: Receiver,
    endpoints: Callable[..., RawEndpoint],
) -> None:
    # A pass ended when its slowest lane did: an endpoint answering in 19 s (inside the timeout, so never held
    # back) kept every other endpoint's new deliveries waiting for the next pass, up to 45 s.
    def slow_ok(conn: socket.socket) -> None:
        time.sleep(2.5)
        answer(b"200 OK")(conn)

    slow = endpoints(slow_ok)
    partner, _, case_id = setup_partner(client, engines[1], receiver)
    assert register(client, partner, slow.url).status_code == 201
    sender = WebhookDispatcher(engine=engines[0], auth_engine=engines[1], env="dev", timeout=5.0)
    running = threading.Thread(target=sender.run_forever, kwargs={"interval": 10.0}, daemon=True)
    running.start()
    try:
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.AWAITING_RECORDS), f"wf:{case_id}:l1")
        sender.wake()
        wait_until(lambda: len(receiver.received) == 1 and slow.requests == 1, "the first event sent to both")
        published = time.monotonic()
        publish(engines[0], case_id, status_changed(case_id, CaseStatus.MATCHING), f"wf:{case_id}:l2")
        sender.wake()
        wait_until(lambda: len(receiver.received) == 2, "the second event sent to the fast endpoint", 5)
        assert receiver.received[1][0] - published < 1.0
        assert slow.requests == 1  # still answering the first: nothing more is sent to it meanwhile
    finally:
        sender.stop()
        running.join(5)
    assert not running.is_alive()
    # Both events to the fast one and the first to the slow one recorded as delivered; the slow one's second
    # is left, unsent, for the sender's next start.
    rows = deliveries_of(engines[0], case_id)
    assert sorted((d.status, d.attempts) for d in rows) == [("delivered", 1)] * 3 + [("pending", 0)]
