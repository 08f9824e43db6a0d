"""Standard Webhooks' replay window: a delivery's `webhook-timestamp` may be at most five minutes from our
clock either way; at the edge it is still accepted, one second past it is refused, saying which way."""

from __future__ import annotations

import pytest

from services.intake.webhook_signing import TOLERANCE_SECONDS, WebhookRejected, read_headers

NOW = 1_790_000_000.4  # our clock, with the fraction a real clock has


def headers(timestamp: int) -> dict[str, str]:
    return {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp), "webhook-signature": "v1,AAAA"}


@pytest.mark.parametrize("offset", [-TOLERANCE_SECONDS + 1, 0, TOLERANCE_SECONDS])
def test_a_timestamp_inside_the_window_is_read(offset: int) -> None:
    timestamp = int(NOW) + offset
    assert read_headers(headers(timestamp), NOW).timestamp == timestamp


@pytest.mark.parametrize(
    ("offset", "says"),
    [
        (-TOLERANCE_SECONDS - 1, "more than 5 minutes old"),
        (TOLERANCE_SECONDS + 1, "more than 5 minutes ahead"),
    ],
)
def test_a_timestamp_past_the_window_is_refused_with_which_way(offset: int, says: str) -> None:
    with pytest.raises(WebhookRejected) as refused:
        read_headers(headers(int(NOW) + offset), NOW)
    assert refused.value.status == 400 and says in refused.value.detail


@pytest.mark.parametrize("raw", ["\u00b2", "1e9", "-5", " 1790000000", "", "1" * 13])
def test_a_timestamp_that_is_not_plain_digits_is_a_400(raw: str) -> None:
    # "²" passes str.isdigit() but not int(): it was a ValueError, a 500, from an unauthenticated header.
    sent = {"webhook-id": "msg_1", "webhook-timestamp": raw, "webhook-signature": "v1,AAAA"}
    with pytest.raises(WebhookRejected) as refused:
        read_headers(sent, NOW)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "webhook_id", ["msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", "f3c1a6e0-8a4b-4c55-9e1b-2d0c", "bWVzc2FnZS8x+Zz=="]
)
def test_ids_senders_use_are_read(webhook_id: str) -> None:
    sent = {"webhook-id": webhook_id, "webhook-timestamp": str(int(NOW)), "webhook-signature": "v1,AAAA"}
    assert read_headers(sent, NOW).webhook_id == webhook_id


@pytest.mark.parametrize("webhook_id", ["msg 1", "msg_1\n", "a,b", "", "x" * 256])
def test_an_id_no_sender_could_mean_is_a_400(webhook_id: str) -> None:
    sent = {"webhook-id": webhook_id, "webhook-timestamp": str(int(NOW)), "webhook-signature": "v1,AAAA"}
    with pytest.raises(WebhookRejected) as refused:
        read_headers(sent, NOW)
    assert refused.value.status == 400
