import pika
import psycopg

from services.common.config import Settings


def test_database_and_vhost_are_fresh(settings: Settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        schemas = {r[0] for r in conn.execute("select schema_name from information_schema.schemata")}
    assert "intake" not in schemas
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        assert conn.is_open
    finally:
        conn.close()
