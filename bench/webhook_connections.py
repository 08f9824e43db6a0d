"""What a connection per webhook attempt costs, side by side with a kept-alive one (not part of `make bench`).

`python -m bench.webhook_connections [--deliveries N] [--rtt-ms R]` sends N signed deliveries of a status
webhook through the sender's own `_post` (the pinned address, the deadline's watchdog, the answer's body
read to keep the connection) to a TLS endpoint on loopback (HTTP/1.1 that keeps connections alive, as a
partner's web server does), in another process so that the CPU counted is the sender's alone:

- `kept alive`: the sender as it is, one connection for all the deliveries;
- `fresh`: the sender with its kept connections closed after each delivery (as it was until 2026-12-07: a
  TCP connection and a TLS handshake per attempt);
- `fresh, plain HTTP`: the same without TLS, to tell the handshake from the connection.

It prints per delivery the sender's wall time (median, p95) and CPU time. Loopback has no round trip, so
the time a partner far away adds is computed, not measured: a fresh connection costs TCP's handshake and
TLS 1.3's (two round trips) before the request's own one, a kept one the request's only (`--rtt-ms`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import ssl
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.intake.webhook_signing import headers_for
from services.intake.webhooks_out import WebhookDispatcher
from tests.pki import Authority

BODY = (
    b'{"type": "case.status_changed", "timestamp": "2026-12-07T08:00:00+00:00", "data": {"case_id": '
    b'"3f1c0d2e-0000-4000-8000-000000000000", "status": "matching", "previous": "awaiting_insurance"}}'
)
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection unless the client closes it

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def serve(cert: str, key: str, tls: bool, port: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    port.value = server.server_address[1]
    server.serve_forever()


def measure(sender: WebhookDispatcher, url: str, deliveries: int, keep: bool) -> tuple[list[float], float]:
    """Wall seconds of each delivery, and the sender's CPU seconds for all of them; without `keep`, the
    sender's kept connection is closed after each delivery."""
    walls: list[float] = []
    cpu = time.process_time()
    for n in range(deliveries):
        headers = {**headers_for([SECRET], f"msg_{n:032x}", int(time.time()), BODY)}
        headers["content-type"] = "application/json"
        started = time.perf_counter()
        response = sender._post(url, "127.0.0.1", BODY, headers, within=20.0)
        if not keep:
            sender.connections.close()
        walls.append(time.perf_counter() - started)
        assert response.status_code == 204, response.status_code
    return walls, time.process_time() - cpu


def row(name: str, walls: list[float], cpu: float, round_trips: int, rtt_ms: float) -> str:
    ms = sorted(w * 1000 for w in walls)
    p95 = ms[int(len(ms) * 0.95) - 1]
    far = statistics.median(ms) + round_trips * rtt_ms
    return (
        f"{name:<18} {statistics.median(ms):7.2f} {p95:7.2f} {cpu * 1000 / len(walls):8.2f} "
        f"{round_trips:>5} {far:10.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_connections", description=__doc__)
    parser.add_argument("--deliveries", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="a partner's round trip, for the estimate")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    authority = Authority(folder, "bench")
    issued = authority.issue("hooks", server=True)
    trusted = ssl.create_default_context(cafile=str(authority.cert))
    servers, urls = [], {}
    for tls in (True, False):
        port = multiprocessing.Value("i", 0)
        server = multiprocessing.Process(
            target=serve, args=(str(issued.cert), str(issued.key), tls, port), daemon=True
        )
        server.start()
        while not port.value:
            time.sleep(0.01)
        servers.append(server)
        urls[tls] = f"{'https' if tls else 'http'}://127.0.0.1:{port.value}/hook"

    print(
        f"{args.deliveries} deliveries each; ms per delivery; 'far' = median + round trips x {args.rtt_ms:g} ms"
    )
    print(f"{'':<18} {'median':>7} {'p95':>7} {'CPU ms':>8} {'RTTs':>5} {'far (est.)':>10}")
    try:
        for name, keep, tls, round_trips in (
            ("kept alive (as is)", True, True, 1),
            ("fresh", False, True, 3),
            ("fresh, plain HTTP", False, False, 2),
        ):
            sender = WebhookDispatcher(engine=None, auth_engine=None, env="dev", tls=trusted)  # type: ignore[arg-type]
            measure(sender, urls[tls], 20, keep)  # warm up: imports, the first handshake's key exchange
            walls, cpu = measure(sender, urls[tls], args.deliveries, keep)
            assert len(sender.connections) == (1 if keep else 0), (
                f"{len(sender.connections)} connections kept"
            )
            sender.close()
            print(row(name, walls, cpu, round_trips, args.rtt_ms))
    finally:
        for server in servers:
            server.terminate()


if __name__ == "__main__":
    main()
