"""The test fixtures isolate each session: its own database and its own RabbitMQ virtual host."""

from urllib.parse import unquote, urlsplit

import pika
import psycopg

from services.common.config import Settings
from tests.infra import docker_available


def test_each_session_has_its_own_database_and_vhost(settings: Settings) -> None:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url) as conn:
        name = conn.execute("select current_database()").fetchone()[0]
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        assert conn.is_open
    finally:
        conn.close()
    if not docker_available():
        assert name.startswith("so_test_")
        assert unquote(urlsplit(settings.amqp_url).path.lstrip("/")).startswith("so_test_")
