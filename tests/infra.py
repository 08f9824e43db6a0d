"""Real PostgreSQL and RabbitMQ for tests.

Where a Docker engine is reachable, testcontainers starts them; these machines have none, so the same
fixtures fall back to the running services named by `DATABASE_URL` / `AMQP_URL`, isolated per test
session by a fresh database and a fresh virtual host that are dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

BASE_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free loopback ports by name: every socket stays bound until all are chosen."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return {name: int(s.getsockname()[1]) for name, s in zip(names, sockets, strict=True)}
    finally:
        for s in sockets:
            s.close()


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
