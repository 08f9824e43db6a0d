"""Every message the platform publishes reaches a queue: a mandatory publish to nowhere would make the
publishing activity retry forever and stall the case."""

from __future__ import annotations

import re

import pytest

from contracts.commands import COMMAND_TYPES
from contracts.events import EVENT_TYPES
from services.common.amqp import COMMANDS, EVENTS, QUEUES


def topic_matches(binding: str, routing_key: str) -> bool:
    pattern = re.escape(binding).replace(r"\*", r"[^.]+").replace(r"\#", r".*")
    return re.fullmatch(pattern, routing_key) is not None


def consumers_of(exchange: str, routing_key: str) -> list[str]:
    return [
        q
        for q, bindings in QUEUES.items()
        for ex, key in bindings
        if ex == exchange and topic_matches(key, routing_key)
    ]


@pytest.mark.parametrize("command", sorted(COMMAND_TYPES))
def test_every_command_has_exactly_one_consuming_service(command: str) -> None:
    assert len(consumers_of(COMMANDS, command)) == 1, consumers_of(COMMANDS, command)


@pytest.mark.parametrize("event", sorted(EVENT_TYPES))
def test_every_event_reaches_a_queue(event: str) -> None:
    assert consumers_of(EVENTS, event), f"{event} would be unroutable"


def test_the_workflow_sees_every_service_event_it_waits_for() -> None:
    for event in (
        "records.assembled",
        "insurance.verified",
        "review.offered",
        "review.submitted",
        "report.ready",
    ):
        assert "workflows.bridge" in consumers_of(EVENTS, event)


def test_topic_matching_is_right() -> None:
    assert topic_matches("records.*", "records.collect")
    assert not topic_matches("records.*", "records.collect.more")
    assert not topic_matches("records.*", "recordsXcollect")
