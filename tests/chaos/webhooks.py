"""The partner's webhook receiver for the chaos run: records every `webhook-id` it is sent (at least once is
allowed; a second id for the same event is a duplicate side effect)."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg


class Receiver:
    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        lock = threading.Lock()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    received[self.headers.get("webhook-id") or "missing"] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secondopinion"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def duplicated_webhooks(database_url: str, received: Counter[str]) -> tuple[dict[str, int], int, int]:
    """Per case, how many events reached the partner under more than one webhook id; plus how many
    deliveries were never delivered, and how many ids the receiver got that intake never recorded."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select id, case_id, source_event_id, status from intake.webhook_deliveries"
        ).fetchall()
    by_event: dict[tuple[str, str], set[str]] = {}
    undelivered = 0
    for webhook_id, case_id, event_id, status in rows:
        if webhook_id in received:
            by_event.setdefault((case_id, event_id), set()).add(webhook_id)
        elif status != "delivered":
            undelivered += 1
    duplicates: dict[str, int] = {}
    for (case_id, _), ids in by_event.items():
        if len(ids) > 1:
            duplicates[case_id] = duplicates.get(case_id, 0) + 1
    unknown = len(set(received) - {row[0] for row in rows})
    return duplicates, undelivered, unknown
