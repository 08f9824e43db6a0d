"""Outbound webhooks keep their connections alive: per address and TLS server name, within the deadline, for a
short time. Real TLS (the test PKI, a certificate per host name chosen by SNI) on loopback, the real sender."""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from contracts.models import CaseStatus
from services.common.config import Settings
from services.intake import api, webhooks_out_api
from services.intake.webhooks_out import WebhookDispatcher
from tests.infra import wait_until
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_outbound_webhooks import Receiver, publish, setup_partner, status_changed
from tests.integration.test_intake_webhooks_misbehaving import (
    attempts_of,
    deliveries_of,
    disable_every_endpoint,
    point_endpoint_at,
    run_once_within,
)
from tests.pki import Authority

Answer = Callable[
    [socket.socket], bool
]  # sends an answer; False: the endpoint closes the connection after it
NAMES = ("a.partner.test", "b.partner.test")  # two partners' host names, both at 127.0.0.1


def no_content(conn: socket.socket) -> bool:
    conn.sendall(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
    return True


@dataclass(frozen=True)
class Request:
    connection: int  # the endpoint's count of the connection it came over, from 0
    server_name: str | None  # that connection's TLS server name (SNI)
    host: str  # the request's Host, without the port
    at: float


class KeptAliveEndpoint:
    """Partners' HTTPS endpoints on one address that keep connections alive (HTTP/1.1), with a certificate for
    each of NAMES, chosen by the server name the client asks for. Each request is answered by the next of
    `answers` (204 once none is left); what came over which connection is recorded, and when the sender
    closed each connection."""

    def __init__(self, authority: Authority) -> None:
        contexts = {}
        for name in NAMES:
            issued = authority.issue(name, server=True, dns_names=(name,))
            contexts[name] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            contexts[name].load_cert_chain(issued.cert, issued.key)
        unnamed = authority.issue("unnamed", server=True)  # for a client that asks for no name
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(unnamed.cert, unnamed.key)
        self.contexts = contexts

        def by_name(sock: ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
            if name in contexts:
                sock.context = contexts[name]

        self.tls.sni_callback = by_name  # type: ignore[assignment]
        self.answers: list[Answer] = []
        self.accepted = 0
        self.requests: list[Request] = []
        self.closed: dict[int, float] = {}  # connection -> when the sender closed it
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, name: str) -> str:
        return f"https://{name}:{self.listener.getsockname()[1]}/hook"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(self.accepted - 1, conn), daemon=True).start()

    def _answer(self, number: int, raw: socket.socket) -> None:
        try:
            conn = self.tls.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        name = next((n for n, context in self.contexts.items() if conn.context is context), None)
        with conn:
            pending = b""
            while True:
                try:
                    head, pending = read_request(conn, pending)
                except OSError:
                    head = None
                if head is None:
                    self.closed[number] = time.monotonic()
                    return
                host = next(
                    line.split(b":", 1)[1].strip().decode()
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"host:")
                )
                self.requests.append(Request(number, name, host.rsplit(":", 1)[0], time.monotonic()))
                answer = self.answers.pop(0) if self.answers else no_content
                try:
                    if not answer(conn):
                        return
                except OSError:  # the sender shut the connection
                    self.closed[number] = time.monotonic()
                    return

    def close(self) -> None:
        self.listener.close()


def read_request(conn: socket.socket, pending: bytes) -> tuple[bytes | None, bytes]:
    """The next request's head (its body read and dropped), and what came after it; None at the end."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        pending += chunk
    head, _, rest = pending.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    return head, rest[length:]


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, webhooks_out_api.router)) as c:
        yield c


@pytest.fixture(autouse=True)
def nothing_left_due(engines: tuple[Engine, Engine]) -> Iterator[None]:
    disable_every_endpoint(engines[0])
    yield
    disable_every_endpoint(engines[0])


@pytest.fixture(autouse=True)
def partner_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """NAMES resolve to 127.0.0.1 (as two partners hosted at one address would)."""
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host in NAMES:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path, "public")


@pytest.fixture
def endpoint(authority: Authority) -> Iterator[KeptAliveEndpoint]:
    e = KeptAliveEndpoint(authority)
    yield e
    e.close()


@pytest.fixture
def dispatcher(engines: tuple[Engine, Engine], authority: Authority) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(
        engine=engines[0],
        auth_engine=engines[1],
        env="dev",
        base_delay=0.05,
        timeout=1.0,
        rng=random.Random(7),
        tls=ssl.create_default_context(cafile=str(authority.cert)),
    )
    yield d
    d.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


STATUSES = (
    CaseStatus.AWAITING_RECORDS,
    CaseStatus.MATCHING,
    CaseStatus.AWAITING_ACCEPTANCE,
    CaseStatus.IN_REVIEW,
)


def partner_at(client: TestClient, engines: tuple[Engine, Engine], url: str) -> str:
    """A partner whose endpoint is `url`; its case's id."""
    receiver = Receiver()
    try:
        partner, _, case_id = setup_partner(client, engines[1], receiver)
    finally:
        receiver.close()
    point_endpoint_at(engines[0], partner["partner_id"], url)
    return case_id


def send(engines: tuple[Engine, Engine], dispatcher: WebhookDispatcher, case_id: str, n: int) -> None:
    """Queue the case's n-th status change and send it in one pass."""
    status = STATUSES[n % len(STATUSES)]
    publish(engines[0], case_id, status_changed(case_id, status), f"wf:{case_id}:k{n}")
    run_once_within(dispatcher, 5.0)


def test_deliveries_to_one_endpoint_go_over_one_connection(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    # A TCP connection and a TLS handshake per delivery cost the sender 1.2 ms of CPU, and a partner 50 ms away
    # two round trips more (100 ms) a delivery: a lane of 20 took 3 s instead of 1 s.
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    for n in range(3):
        publish(engines[0], case_id, status_changed(case_id, STATUSES[n]), f"wf:{case_id}:k{n}")
    run_once_within(dispatcher, 5.0)  # one lane, three deliveries
    send(engines, dispatcher, case_id, 3)  # and the next pass's

    assert [d.status for d in deliveries_of(engines[0], case_id)] == ["delivered"] * 4
    assert endpoint.accepted == 1
    assert [(r.connection, r.server_name, r.host) for r in endpoint.requests] == [(0, NAMES[0], NAMES[0])] * 4


def test_two_partners_at_one_address_never_share_a_connection(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    # The sender connects to the checked address, so httpx's pool (keyed by the request's origin) would hand
    # the connection made for one partner's name, its certificate checked for that name, to the other's.
    a_case = partner_at(client, engines, endpoint.url(NAMES[0]))
    b_case = partner_at(client, engines, endpoint.url(NAMES[1]))
    for n in range(2):  # one pass each, in turn: each finds the other's connection unused
        send(engines, dispatcher, a_case, n)
        send(engines, dispatcher, b_case, n)

    assert all(r.server_name == r.host for r in endpoint.requests), endpoint.requests
    assert [(r.connection, r.host) for r in endpoint.requests] == [
        (0, NAMES[0]),
        (1, NAMES[1]),
        (0, NAMES[0]),
        (1, NAMES[1]),
    ]
    assert endpoint.accepted == 2
    assert {d.status for d in deliveries_of(engines[0], a_case) + deliveries_of(engines[0], b_case)} == {
        "delivered"
    }


def drip_headers(conn: socket.socket) -> bool:
    """A status line, then a header line now and then, for ever: each read gets something."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        time.sleep(0.2)
        conn.sendall(b"x-wait: 1\r\n")


def test_a_slow_answer_on_a_kept_connection_is_cut_at_the_deadline_and_the_next_attempt_connects_anew(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    # httpcore names a connection's socket only when it connects: the deadline must still shut the socket
    # of a kept connection, and a connection cut at the deadline is not kept.
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    send(engines, dispatcher, case_id, 0)
    endpoint.answers = [drip_headers]
    publish(engines[0], case_id, status_changed(case_id, STATUSES[1]), f"wf:{case_id}:k1")

    took = run_once_within(dispatcher, 5.0)

    assert took < 3.0
    slow = next(d for d in deliveries_of(engines[0], case_id) if d.status == "pending")
    [attempt] = attempts_of(engines[0], slow.id)
    assert attempt.status_code is None and "did not answer within 1 s" in attempt.error, attempt.error
    wait_until(lambda: 0 in endpoint.closed, "the sender closing the connection cut at the deadline", 2)
    time.sleep(0.1)  # the retry is due after about 0.05 s
    run_once_within(dispatcher, 5.0)
    assert [d.status for d in deliveries_of(engines[0], case_id)] == ["delivered"] * 2
    assert [r.connection for r in endpoint.requests] == [0, 0, 1] and endpoint.accepted == 2


def hang_up(conn: socket.socket) -> bool:
    """Closes the connection on the request, unanswered: its idle time ran out as the request came."""
    return False


def test_a_kept_connection_the_endpoint_closes_as_the_request_goes_out_costs_no_attempt(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    # Servers close idle connections after a few seconds (Node.js 5 s, gunicorn 2 s); one closed just as the
    # sender reuses it is sent the request again on a new connection, not logged as an endpoint failing.
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    endpoint.answers = [no_content, hang_up]
    send(engines, dispatcher, case_id, 0)
    send(engines, dispatcher, case_id, 1)

    assert [(d.status, d.attempts) for d in deliveries_of(engines[0], case_id)] == [("delivered", 1)] * 2
    assert [r.connection for r in endpoint.requests] == [0, 0, 1]


def test_an_endpoint_that_hangs_up_on_every_request_costs_the_attempt_not_a_loop(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    send(engines, dispatcher, case_id, 0)
    endpoint.answers = [hang_up] * 10
    send(engines, dispatcher, case_id, 1)

    rows = sorted(deliveries_of(engines[0], case_id), key=lambda d: d.created_at)
    assert [(d.status, d.attempts) for d in rows] == [("delivered", 1), ("pending", 1)]
    assert "closed the connection" in rows[1].last_error
    assert [r.connection for r in endpoint.requests] == [0, 0, 1]  # sent again once, on a new connection


def answer_with(head: bytes, body: bytes) -> Answer:
    def answer(conn: socket.socket) -> bool:
        conn.sendall(head + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        return True  # the endpoint would keep the connection: the sender decides

    return answer


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        (answer_with(b"HTTP/1.1 200 OK\r\n", b"x" * 65536), True),  # 64 KiB: read, dropped, kept
        (answer_with(b"HTTP/1.1 200 OK\r\n", b"x" * 65537), False),
        (answer_with(b"HTTP/1.1 200 OK\r\nconnection: close\r\n", b""), False),
        (answer_with(b"HTTP/1.0 200 OK\r\n", b""), False),
    ],
)
def test_an_answer_longer_than_the_bound_or_asking_to_close_closes_its_connection(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
    answer: Answer,
    kept: bool,
) -> None:
    # A kept connection needs the answer's body read to its end: read up to 64 KiB (a body without end held
    # the sender once), a longer one is left unread and its connection closed. The answer counts either way.
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    endpoint.answers = [answer]
    send(engines, dispatcher, case_id, 0)
    send(engines, dispatcher, case_id, 1)

    assert [d.status for d in deliveries_of(engines[0], case_id)] == ["delivered"] * 2
    assert [r.connection for r in endpoint.requests] == ([0, 0] if kept else [0, 1])
    if not kept:
        wait_until(lambda: 0 in endpoint.closed, "the sender closing the connection", 2)


def test_a_connection_unused_for_its_idle_time_is_closed(
    client: TestClient,
    engines: tuple[Engine, Engine],
    dispatcher: WebhookDispatcher,
    endpoint: KeptAliveEndpoint,
) -> None:
    # A kept connection holds a worker (or a slot) of the partner's server: unused, it is closed after IDLE
    # (30 s; 0.5 s here), by the running sender, with or without deliveries to send.
    dispatcher.connections.idle = 0.5
    case_id = partner_at(client, engines, endpoint.url(NAMES[0]))
    running = threading.Thread(target=dispatcher.run_forever, kwargs={"interval": 0.1}, daemon=True)

    def sent(n: int) -> None:
        publish(engines[0], case_id, status_changed(case_id, STATUSES[n]), f"wf:{case_id}:k{n}")
        dispatcher.wake()
        wait_until(lambda: len(endpoint.requests) == n + 1, f"delivery {n + 1}", 5)

    running.start()
    try:
        sent(0)
        sent(1)
        wait_until(lambda: 0 in endpoint.closed, "the idle connection closed", 3)
        sent(2)
    finally:
        dispatcher.stop()
        running.join(5)
    assert endpoint.closed[0] - endpoint.requests[1].at >= 0.45  # kept for its idle time, not closed at once
    assert [r.connection for r in endpoint.requests] == [0, 0, 1]
