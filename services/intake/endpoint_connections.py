"""Connections to partner endpoints kept alive between attempts, each for the one address and name it was made for.

httpx pools connections by the request's origin, which for the sender is the pinned address (see
`WebhookDispatcher._post`): two partners hosted at one address would share a connection whose certificate
was checked for the other's name. Here a connection is kept for its exact `ConnectionKey` (scheme, pinned
address, port, TLS server name), so a name that resolves to another address gets another connection, and
it is lent to one attempt at a time, which knows its socket before it sends: the attempt's `Deadline`
shuts it (httpcore names a connection's socket only when it connects).

A connection is given back only after an answer read whole (its body within MAX_ANSWER_BODY, dropped as it
is read) that does not close it; anything else (an error, the deadline, a longer body, `Connection: close`)
closes it. Unused for IDLE seconds, it is closed; at most MAX_KEPT are kept.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

IDLE = 30.0  # seconds a kept connection may wait unused: a partner's server is not held longer
MAX_KEPT = 32  # kept connections, all endpoints together (the oldest unused one is closed first)
MAX_ANSWER_BODY = 64 * 1024  # bytes of an answer's body read to keep its connection; a longer one closes it


class ConnectionKey(NamedTuple):
    """What a kept connection may be used for: only the very same of all four."""

    scheme: str
    address: str  # the pinned address `check_url` allowed
    port: int
    server_name: str  # the URL's host: the TLS server name its certificate was checked against


@dataclass(eq=False)
class EndpointConnection:
    """One connection (at most) to one `ConnectionKey`; `sock` is its socket once an answer came over it."""

    transport: httpx.HTTPTransport
    sock: socket.socket | None = None
    unused_since: float = 0.0

    def close(self) -> None:
        self.transport.close()


class EndpointConnections:
    """The kept connections of a sender, lent to one attempt at a time (lanes take them from their threads)."""

    def __init__(self, tls: ssl.SSLContext, idle: float = IDLE, most: int = MAX_KEPT) -> None:
        self.tls = tls
        self.idle = idle
        self.most = most
        self._kept: dict[ConnectionKey, list[EndpointConnection]] = {}
        self._lock = threading.Lock()

    def take(self, key: ConnectionKey) -> EndpointConnection:
        """A kept connection for `key`, the one used last first, or a new one."""
        self.close_idle()
        with self._lock:
            kept = self._kept.get(key)
            if kept:
                connection = kept.pop()
                if not kept:
                    del self._kept[key]
                return connection
        return self.new()

    def new(self) -> EndpointConnection:
        """A connection not made yet (it connects on first use)."""
        # One connection a transport: the one the attempt is lent is the one its request goes over.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=self.idle)
        return EndpointConnection(httpx.HTTPTransport(verify=self.tls, limits=limits))

    def give_back(self, key: ConnectionKey, connection: EndpointConnection) -> None:
        """Keep `connection` for the next attempt to `key`; past `most` kept, the longest unused is closed."""
        connection.unused_since = time.monotonic()
        with self._lock:
            self._kept.setdefault(key, []).append(connection)
            kept = sorted((c for cs in self._kept.values() for c in cs), key=lambda c: c.unused_since)
            closing = self._take_out(kept[: max(len(kept) - self.most, 0)])
        for old in closing:
            old.close()

    def close_idle(self) -> None:
        """Close the connections unused for `idle` seconds or longer."""
        since = time.monotonic() - self.idle
        with self._lock:
            closing = self._take_out([c for cs in self._kept.values() for c in cs if c.unused_since <= since])
        for old in closing:
            old.close()

    def close(self) -> None:
        with self._lock:
            closing = self._take_out([c for cs in self._kept.values() for c in cs])
        for old in closing:
            old.close()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(kept) for kept in self._kept.values())

    def _take_out(self, closing: list[EndpointConnection]) -> list[EndpointConnection]:
        if closing:
            for key in list(self._kept):
                self._kept[key] = [c for c in self._kept[key] if all(c is not old for old in closing)]
                if not self._kept[key]:
                    del self._kept[key]
        return closing


class Watchdog:
    """One thread that expires every attempt's `Deadline` when it is due, instead of a timer thread started (and
    left to wait) per attempt. An ended deadline is dropped when it reaches the front."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline, at: float) -> None:
        with self._changed:
            heapq.heappush(self._due, (at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="webhook-deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()

    def __len__(self) -> int:
        with self._changed:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._due and self._due[0][2].ended:
                        heapq.heappop(self._due)
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        _, _, due = heapq.heappop(self._due)
                        break
                    self._changed.wait(self._due[0][0] - now if self._due else None)
            due.expire()


WATCHDOG = Watchdog()


class Deadline:
    """An attempt's deadline: at it, the sockets of the connections the attempt goes over are shut, and a
    connection made after it at once. `trace` is the httpcore trace hook that names a new connection's
    socket (a kept one's is `watch`ed). Once `end`ed, it shuts nothing (the connection may be kept)."""

    def __init__(self, within: float, watchdog: Watchdog = WATCHDOG) -> None:
        self._sockets: list[socket.socket] = []
        self._turn = threading.Lock()
        self._expired = False
        self._ended = False
        watchdog.watch(self, time.monotonic() + within)

    @property
    def expired(self) -> bool:
        return self._expired

    @property
    def ended(self) -> bool:
        return self._ended

    def watch(self, sock: socket.socket) -> None:
        with self._turn:
            self._sockets.append(sock)
            if self._expired:
                shut(sock)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.watch(info["return_value"].get_extra_info("socket"))

    def end(self) -> bool:
        """Stop watching; whether the deadline had passed (what it shut is not to be kept)."""
        with self._turn:
            self._ended = True
            return self._expired

    def expire(self) -> None:
        """The watchdog's, at the deadline."""
        with self._turn:
            if self._ended:
                return
            self._expired = True
            for sock in self._sockets:
                shut(sock)


def shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or the plain socket under TLS
        sock.shutdown(socket.SHUT_RDWR)


def read_whole(response: httpx.Response, most: int = MAX_ANSWER_BODY) -> bool:
    """Read the answer's body to its end, dropping it as it comes; False (left unread) past `most` bytes."""
    read = 0
    for chunk in response.iter_raw():
        read += len(chunk)
        if read > most:
            return False
    return True


def may_keep(response: httpx.Response) -> bool:
    """Whether the answer, read whole, leaves its connection open for the next request (HTTP/1.1 without
    `Connection: close`; httpcore has closed it otherwise, and its socket tells)."""
    closing = "close" in (token.strip().lower() for token in response.headers.get_list("connection", True))
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return (
        response.extensions.get("http_version") == b"HTTP/1.1"
        and not closing
        and sock is not None
        and sock.fileno() != -1
    )
