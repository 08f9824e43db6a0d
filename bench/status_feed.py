"""The bench partner's webhook endpoint: `case.status_changed` deliveries kept per case, awaited by the bots.

A partner's integration learns of a status change from our webhook, not by polling: polling would add up to
its interval to every wait the benchmark counts as the system's time, and load intake with reads (each one
audited) that no real partner makes at that rate. The endpoint listens on loopback (plain HTTP is allowed
there in development) and does not check signatures: it is the benchmark's own bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from bench.system import System


class StatusFeed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: dict[str, asyncio.Event] = {}
        feed = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a partner's web server would: HTTP/1.0 (the default here) closes every
            # connection and made our sender connect afresh for each delivery.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    delivery = json.loads(body)
                    if delivery["type"] == "case.status_changed":
                        feed._delivered(str(delivery["data"]["case_id"]), str(delivery["data"]["status"]))

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-webhooks", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhooks"

    def _delivered(self, case_id: str, status: str) -> None:
        with self._lock:
            self._seen[case_id].add(status)
            loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, case_id)

    def _wake(self, case_id: str) -> None:
        changed = self._changed.get(case_id)
        if changed is not None:
            changed.set()

    async def wait_for(self, case_id: str, status: str, timeout: float = 300) -> None:
        """Until the case's `status` was delivered (at once if it already was)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            with self._lock:
                self._loop, self._changed = loop, {}
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                if status in self._seen[case_id]:
                    return
            changed = self._changed.setdefault(case_id, asyncio.Event())
            changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RuntimeError(f"no webhook said case {case_id} reached {status} within {timeout:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.asynccontextmanager
async def subscribed(http: httpx.AsyncClient, system: System) -> AsyncIterator[StatusFeed]:
    """A feed registered as the partner's webhook endpoint for as long as the block runs."""
    feed = StatusFeed()
    endpoints = f"{system.settings.intake_url}/v1/partners/{system.partner_id}/webhook-endpoints"
    created = await http.post(endpoints, json={"url": feed.url})
    if created.status_code != 201:
        feed.close()
        raise RuntimeError(
            f"intake refused the bench's webhook endpoint: {created.status_code} {created.text}"
        )
    try:
        yield feed
    finally:
        # Later benchmarks' cases must not queue deliveries to an endpoint that is gone.
        await http.delete(f"{endpoints}/{created.json()['endpoint_id']}")
        feed.close()
