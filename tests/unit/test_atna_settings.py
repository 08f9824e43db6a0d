"""The ATNA feed is off unless configured, and in production it starts only over mutual TLS."""

from __future__ import annotations

from services.auth.atna_forward import AtnaSettings


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
