"""The readiness check of `make demo` and the chaos harness: a port is open when something listens on it,
and a connection that reached only itself (a TCP self-connect) is not that."""

from __future__ import annotations

import socket

from scripts.stack import port_open, reaches_another


def test_a_listening_port_is_open_and_a_closed_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert port_open(port)
    assert not port_open(port)


def test_a_connection_to_itself_is_not_a_listener() -> None:
    # What the kernel may do with a connection to a port of the ephemeral range that nobody listens on:
    # give it that very port as its own. Forced here by binding first; a chaos run met it by chance.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.connect(sock.getsockname())
        assert sock.getsockname() == sock.getpeername()  # connected, to itself
        assert not reaches_another(sock)
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as sock,
    ):
        assert reaches_another(sock)
