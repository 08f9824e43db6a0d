"""Activities of the case workflow: they publish commands and status changes on RabbitMQ."""

from __future__ import annotations

import threading

from temporalio import activity

from contracts.envelope import CloudEvent, new_event
from contracts.events import CaseStatusChanged
from services.common.amqp import COMMANDS, EVENTS, Publisher
from services.common.config import Settings
from workflows.models import PublishCommand, PublishStatus

SOURCE = "/workflows/case"


def message_id() -> str:
    """Deterministic for retried work: the same activity attempt publishes the same id."""
    info = activity.info()
    return f"{info.workflow_id}:{info.workflow_run_id}:{info.activity_id}"


class CaseActivities:
    """Holds one publisher per activity thread (a pika connection belongs to one thread)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _publisher(self) -> Publisher:
        publisher = getattr(self._local, "publisher", None)
        if publisher is None:
            publisher = self._local.publisher = Publisher(self.settings)
        return publisher

    @activity.defn
    def publish_command(self, command: PublishCommand) -> str:
        event = CloudEvent(
            id=message_id(),
            source=SOURCE,
            type=command.type,
            subject=command.case_id,
            time=activity.info().started_time,
            data=command.data,
        )
        self._publisher().publish(COMMANDS, event)
        return event.id

    @activity.defn
    def publish_status(self, change: PublishStatus) -> str:
        event = new_event(
            id=message_id(),
            source=SOURCE,
            subject=change.case_id,
            data=CaseStatusChanged(
                case_id=change.case_id,
                status=change.status,
                previous=change.previous,
                at=change.at,
                detail=change.detail,
            ),
        )
        self._publisher().publish(EVENTS, event)
        return event.id
