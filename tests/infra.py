"""Real PostgreSQL and RabbitMQ for tests.

Where a Docker engine is reachable, testcontainers starts them; these machines have none, so the same
fixtures fall back to the running services named by `DATABASE_URL` / `AMQP_URL`, isolated per test
session by a fresh database and a fresh virtual host that are dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

BASE_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


LOWEST_PORT = 20000  # test servers listen from here up to the kernel's ephemeral range


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for automatically assigned ports (outgoing connections, binds to port 0)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(n) for n in text.split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free loopback ports by name, each free when chosen (every socket stays bound until all are).

    They are picked at random below the ephemeral range: a port from a bind to port 0 lies in that range,
    and any outgoing connection on the machine may be given it before the server that was to listen there
    binds it (seen in CI: a service of the e2e stack failed with "address already in use")."""
    rng = random.SystemRandom()
    highest = ephemeral_ports()[0] - 1
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < len(names):
            s = socket.socket()
            port = rng.randrange(LOWEST_PORT, highest) if highest > LOWEST_PORT + 1000 else 0
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: listening, or in use by a connection
                s.close()
                continue
            sockets.append(s)
        return {name: int(s.getsockname()[1]) for name, s in zip(names, sockets, strict=True)}
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One free loopback port (see `free_ports`)."""
    return free_ports(("port",))["port"]


def wait_until(condition: Callable[[], object], what: str = "the condition", timeout: float = 15) -> None:
    """Poll `condition` until it holds; fail the test, naming `what`, once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.05)


def docker_available() -> bool:
    sock = "/var/run/docker.sock"
    if not os.path.exists(sock):
        return False
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        s.connect(sock)
        return True
    return False


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database; its URL is yielded and the database dropped afterwards."""
    if docker_available():  # pragma: no cover - no Docker engine on these machines
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    name = f"so_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(BASE_DATABASE_URL)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh virtual host on the running broker (so tests never see each other's queues)."""
    if docker_available():  # pragma: no cover - no Docker engine on these machines
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as mq:
            p = mq.get_connection_params()
            yield f"amqp://guest:guest@{p.host}:{p.port}/%2F"
        return
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        yield BASE_AMQP_URL
        return
    vhost = f"so_test_{uuid.uuid4().hex[:10]}"
    user = urlsplit(BASE_AMQP_URL).username or "guest"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"], check=True, capture_output=True
    )
    parts = urlsplit(BASE_AMQP_URL)
    try:
        yield urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], check=False, capture_output=True)


def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages ready in `queue`. One delivered and not yet acked is not counted; it is again once the
    channel it was delivered on closes."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def purge_queues(amqp_url: str, *queues: str) -> None:
    """Empty queues that earlier tests in the same vhost may have left messages in."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        for queue in queues:
            channel.queue_purge(queue)
    finally:
        conn.close()
