"""The ATNA feed is off unless configured, in production it starts only over mutual TLS (or UDP where the operator
allows it), and it outlives an outage of its database."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine

from services.auth.atna_forward import AtnaSettings, Forwarder, SyslogUdp


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
    assert "udp://" in AtnaSettings(url="syslog://repository.example.org:514").problems("dev")[0]


def test_udp_is_taken_and_in_production_only_where_the_operator_allows_it() -> None:
    """Many hospital repositories take only UDP (RFC 5426, which ITI-20 has every repository accept); it carries
    the audit trail unencrypted and unacknowledged, so ENV=prod asks for AUDIT_ATNA_ALLOW_UDP=true."""
    udp = AtnaSettings(url="udp://repository.example.org:514")
    assert udp.problems("dev") == []
    assert udp.problems("prod") == [
        "AUDIT_ATNA_URL udp:// sends the audit trail unencrypted and unacknowledged (RFC 5426): in production "
        "use tls:// (RFC 5425), or set AUDIT_ATNA_ALLOW_UDP=true if the hospital's repository takes only UDP on "
        "a network trusted with it"
    ]
    assert AtnaSettings(url="udp://repository.example.org:514", allow_udp=True).problems("prod") == []
    assert AtnaSettings(url="tcp://repository.example.org:514", allow_udp=True).problems("prod") == [
        "AUDIT_ATNA_URL must use tls:// in production (RFC 5425)",
        "AUDIT_ATNA_CERT_FILE and AUDIT_ATNA_KEY_FILE are required in production (mutual TLS)",
    ]


def test_the_datagram_limit_is_one_every_receiver_takes_at_least_and_udp_can_carry() -> None:
    assert AtnaSettings(url="udp://repository.example.org:514", udp_max_octets=400).problems("dev") == [
        "AUDIT_ATNA_UDP_MAX_OCTETS must be from 480 (what RFC 5426 has every IPv4 receiver take) to 65507 "
        "(the largest UDP datagram over IPv4), not 400"
    ]
    assert AtnaSettings(url="udp://repository.example.org:514", udp_max_octets=70000).problems("dev") != []
    assert AtnaSettings(url="udp://repository.example.org:514", udp_max_octets=2048).problems("dev") == []


def test_a_database_that_cannot_be_read_is_waited_out_not_fatal(tmp_path: Path) -> None:
    """The forwarder outlives its database's outage (it retries with the same backoff as for the repository);
    before, the first failed read ended the process and no entry was forwarded until someone restarted it."""
    unreadable = create_engine(f"sqlite:///{tmp_path / 'missing' / 'auth.db'}")
    forwarder = Forwarder(unreadable, AtnaSettings(url="tcp://127.0.0.1:9", poll_seconds=0.05))
    threading.Timer(0.5, forwarder.stop.set).start()
    forwarder.run()  # returns once stopped, having retried
    assert forwarder.stop.is_set()


def test_udp_datagrams_go_evenly_at_the_rate_set_not_as_one_burst() -> None:
    """A batch (up to 200) went out at once: a repository's receive buffer could overflow, and UDP says nothing
    of what it drops."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    try:
        paced = SyslogUdp(AtnaSettings(url=f"udp://127.0.0.1:{port}", udp_per_second=100))
        messages = [f"<86>1 - - - - - - entry {n}".encode() for n in range(30)]
        started = time.monotonic()
        paced.send(messages)
        elapsed = time.monotonic() - started
        paced.close()
        assert [receiver.recv(100) for _ in messages] == messages  # each one, in order
        assert elapsed >= 29 / 100 * 0.95  # 30 datagrams at 100 a second: 29 spacings at the least
        assert not AtnaSettings(url=f"udp://127.0.0.1:{port}", udp_per_second=0).problems("dev")  # 0: unpaced
        [negative] = AtnaSettings(url=f"udp://127.0.0.1:{port}", udp_per_second=-1).problems("dev")
        assert "AUDIT_ATNA_UDP_PER_SECOND" in negative
    finally:
        receiver.close()
