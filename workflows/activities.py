"""Activities of the case workflow: they publish commands and the workflow's own events on RabbitMQ."""

from __future__ import annotations

import threading

from temporalio import activity

from contracts.envelope import CloudEvent
from services.common.amqp import COMMANDS, EVENTS, Publisher
from services.common.config import Settings
from services.common.crashpoints import crash_point
from workflows.models import PublishBatch, PublishCommand, PublishEvent

SOURCE = "/workflows/case"


def message_id() -> str:
    """Deterministic for retried work: every attempt of one activity publishes the same id. Local
    activities count from 1 on their own, so theirs are marked apart from the (older) regular ones."""
    info = activity.info()
    activity_id = f"local-{info.activity_id}" if info.is_local else info.activity_id
    return f"{info.workflow_id}:{info.workflow_run_id}:{activity_id}"


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

    def _publish(self, exchange: str, case_id: str, type_: str, data: dict, id_: str | None = None) -> str:
        event = CloudEvent(
            id=id_ or message_id(),
            source=SOURCE,
            type=type_,
            subject=case_id,
            time=activity.info().started_time,
            data=data,
        )
        self._publisher().publish(exchange, event)
        crash_point("activity.after_publish_before_complete", type_)
        return event.id

    @activity.defn
    def publish_command(self, command: PublishCommand) -> str:
        return self._publish(COMMANDS, command.case_id, command.type, command.data)

    @activity.defn
    def publish_event(self, event: PublishEvent) -> str:
        return self._publish(EVENTS, event.case_id, event.type, event.data)

    @activity.defn
    def publish_batch(self, batch: PublishBatch) -> list[str]:
        """Publish one step's messages in order, each confirmed before the next. A retry publishes them all
        again with the same ids (`<activity's id>.<n>`), which the consumers' inboxes drop."""
        base = message_id()
        return [
            self._publish(
                EVENTS if message.kind == "event" else COMMANDS,
                batch.case_id,
                message.type,
                message.data,
                id_=f"{base}.{n}",
            )
            for n, message in enumerate(batch.messages)
        ]
