import random
from datetime import UTC, datetime, timedelta

import pytest

from services.intake.webhooks_out import EndpointRefused, backoff, check_url, retry_after, webhook_id

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def public(_: str) -> list[str]:
    return ["93.184.216.34"]


@pytest.mark.parametrize(
    ("url", "env", "resolved", "why"),
    [
        ("http://hooks.example.org/x", "prod", public, "https"),
        ("https://127.0.0.1/x", "prod", None, "private, loopback"),
        ("https://10.1.2.3/x", "dev", None, "private"),
        ("https://169.254.169.254/x", "dev", None, "link-local"),
        ("https://[::1]/x", "prod", None, "loopback"),
        ("https://internal.example.org/x", "prod", lambda _: ["93.184.216.34", "192.168.0.7"], "private"),
        ("https://user:pw@hooks.example.org/x", "prod", public, "user:password"),
        # IPv6 addresses that carry a private IPv4 one: NAT64, 6to4, Teredo, IPv4-compatible.
        ("https://[64:ff9b::a9fe:a9fe]/x", "prod", None, "link-local"),
        ("https://[64:ff9b::7f00:1]/x", "dev", None, "loopback"),
        ("https://[2002:a00:1::]/x", "prod", None, "private"),
        ("https://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/x", "prod", None, "private"),
        ("https://[::169.254.169.254]/x", "prod", None, "link-local"),
        ("https://nat64.example.org/x", "prod", lambda _: ["64:ff9b::a00:1"], "private"),
    ],
)
def test_refused_endpoints_say_why(url, env, resolved, why) -> None:
    with pytest.raises(EndpointRefused, match=why):
        check_url(url, env, resolved)


@pytest.mark.parametrize(
    ("url", "env"),
    [
        ("https://hooks.example.org/x", "prod"),
        ("http://127.0.0.1:9000/x", "dev"),
        ("http://localhost/x", "dev"),
        ("https://[2606:2800:220:1:248:1893:25c8:1946]/x", "prod"),
        ("https://[64:ff9b::5db8:d822]/x", "prod"),  # NAT64 of a public IPv4 address
    ],
)
def test_accepted_endpoints(url, env) -> None:
    check_url(url, env, (lambda _: ["127.0.0.1"]) if "127" in url or "localhost" in url else public)


def test_retry_after_in_seconds_or_as_a_date_and_capped() -> None:
    assert retry_after("120", NOW) == timedelta(seconds=120)
    assert retry_after("Sat, 28 Nov 2026 12:05:00 GMT", NOW) == timedelta(minutes=5)
    assert retry_after("999999", NOW) == timedelta(hours=6)
    assert retry_after("soon", NOW) is None and retry_after(None, NOW) is None
    assert retry_after("9" * 5000, NOW) == timedelta(hours=6)  # too long for int(): still the cap
    assert retry_after("\u00b2", NOW) is None  # a digit to str.isdigit(), not a number of seconds


def test_backoff_follows_the_standard_webhooks_schedule_over_days() -> None:
    from services.intake.webhooks_out import MAX_ATTEMPTS

    rng = random.Random(3)
    waits = [backoff(n, 5.0, 86400.0, rng) for n in range(1, MAX_ATTEMPTS)]
    assert waits[0] <= 5.0 and waits[-1] >= 0.8 * 86400
    assert sum(waits) >= 2 * 86400  # a partner's endpoint may be down over a weekend night


def test_webhook_id_is_stable_per_endpoint_and_event() -> None:
    assert webhook_id("e1", "ev1") == webhook_id("e1", "ev1") != webhook_id("e2", "ev1")
