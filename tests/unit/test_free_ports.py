"""The ports test stacks listen on: free, distinct, and out of reach of the kernel's automatic assignment."""

from __future__ import annotations

import random
import socket

import pytest

from tests import infra
from tests.infra import ephemeral_ports, free_port, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    names = tuple(f"service-{n}" for n in range(12))
    ports = free_ports(names)
    assert list(ports) == list(names)
    assert len(set(ports.values())) == len(names)
    # An outgoing connection is given a port from the ephemeral range; a server's port must not be one it
    # could be given between choosing it and binding it.
    assert all(port < ephemeral_ports()[0] for port in ports.values())
    for port in ports.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_already_listening_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        taken = listener.getsockname()[1]

        class TakenFirst:
            """Draws the listening port first, then others: free_ports must pass over it."""

            def __init__(self) -> None:
                self.draws = iter([taken, taken])

            def randrange(self, low: int, high: int) -> int:
                return next(self.draws, random.randrange(low, high))

        monkeypatch.setattr(infra.random, "SystemRandom", TakenFirst)
        ports = free_ports(("a",))
    assert ports["a"] != taken
