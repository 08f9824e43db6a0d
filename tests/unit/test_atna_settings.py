"""The ATNA feed is off unless configured, in production it starts only over mutual TLS, and it outlives an
outage of its database."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import create_engine

from services.auth.atna_forward import AtnaSettings, Forwarder


def test_the_feed_is_off_by_default_and_says_what_to_set() -> None:
    assert AtnaSettings(_env_file=None).url == ""  # type: ignore[call-arg]
    assert AtnaSettings(url="").problems("dev") == [
        "AUDIT_ATNA_URL is not set (tls://host:port of the audit record repository)"
    ]


def test_in_production_only_mutual_tls_will_do() -> None:
    plain = AtnaSettings(url="tcp://repository.example.org:514")
    assert plain.problems("dev") == []
    assert plain.problems("prod") == [
        "AUDIT_ATNA_URL must use tls:// in production (RFC 5425)",
        "AUDIT_ATNA_CERT_FILE and AUDIT_ATNA_KEY_FILE are required in production (mutual TLS)",
    ]
    mutual = AtnaSettings(url="tls://repository.example.org:6514", cert_file="/c.pem", key_file="/k.pem")
    assert mutual.problems("prod") == []
    assert "udp://" in AtnaSettings(url="udp://repository.example.org:514").problems("dev")[0]


def test_a_database_that_cannot_be_read_is_waited_out_not_fatal(tmp_path: Path) -> None:
    """The forwarder outlives its database's outage (it retries with the same backoff as for the repository);
    before, the first failed read ended the process and no entry was forwarded until someone restarted it."""
    unreadable = create_engine(f"sqlite:///{tmp_path / 'missing' / 'auth.db'}")
    forwarder = Forwarder(unreadable, AtnaSettings(url="tcp://127.0.0.1:9", poll_seconds=0.05))
    threading.Timer(0.5, forwarder.stop.set).start()
    forwarder.run()  # returns once stopped, having retried
    assert forwarder.stop.is_set()
