"""An attempt's deadline shuts its connection's socket when due, from one watchdog thread for all attempts."""

from __future__ import annotations

import socket
import threading
import time

from services.intake.endpoint_connections import Deadline, Watchdog


def a_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    return ours, theirs


def test_a_due_deadline_shuts_its_socket_and_an_ended_one_shuts_nothing() -> None:
    watchdog = Watchdog()
    due, due_peer = a_pair()
    kept, kept_peer = a_pair()
    started = time.monotonic()
    expiring = Deadline(0.2, watchdog)
    expiring.watch(due)
    ended = Deadline(0.1, watchdog)
    ended.watch(kept)
    assert ended.end() is False  # ended before its time: the connection may be kept

    assert due.recv(1) == b""  # the read waiting on the answer ends: the socket was shut at the deadline
    assert 0.15 <= time.monotonic() - started < 2
    assert expiring.expired and expiring.end() is True
    time.sleep(0.2)
    kept_peer.sendall(b"x")
    assert kept.recv(1) == b"x"  # past its time, the ended deadline's socket still works
    for s in (due, due_peer, kept, kept_peer):
        s.close()


def test_a_socket_watched_after_the_deadline_is_shut_at_once() -> None:
    late, peer = a_pair()
    deadline = Deadline(0.0, Watchdog())
    time.sleep(0.1)
    assert deadline.expired
    deadline.watch(late)  # a connection made after the deadline
    assert late.recv(1) == b""
    late.close()
    peer.close()


def test_a_thousand_attempts_start_no_thread_each_and_expire_in_the_order_due() -> None:
    watchdog = Watchdog()
    threads = threading.active_count()
    deadlines = [Deadline(0.05 + (n % 10) / 100, watchdog) for n in range(1000)]
    assert threading.active_count() <= threads + 1  # the watchdog's one thread
    for n, deadline in enumerate(deadlines):
        if n % 2:
            deadline.end()
    time.sleep(0.5)
    assert all(d.expired != d.ended for d in deadlines)  # the ended ones never expired, the others all did
    assert len(watchdog) == 0
