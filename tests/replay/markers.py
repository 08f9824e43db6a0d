"""What a case's history says about the patches it asked (`workflow.patched`), for the replay and workflow tests."""

from __future__ import annotations

import json

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory

PATCH_MARKER = "core_patch"  # the SDK core's MarkerRecorded name for a patch


def patch_id(event: HistoryEvent) -> str | None:
    """The patch a MarkerRecorded event records, or None for any other event."""
    marker = event.marker_recorded_event_attributes
    if not event.HasField("marker_recorded_event_attributes") or marker.marker_name != PATCH_MARKER:
        return None
    [payload] = marker.details["patch-data"].payloads
    return str(json.loads(payload.data)["id"])


def patches_by_task(history: WorkflowHistory) -> list[tuple[int, str]]:
    """(n, patch id) for each patch marker: recorded by the n-th completed workflow task (1 for the first)."""
    completed = 0
    found = []
    for event in history.events:
        if event.HasField("workflow_task_completed_event_attributes"):
            completed += 1
        elif (patch := patch_id(event)) is not None:
            found.append((completed, patch))
    return found


def late_local_activity_results(history: WorkflowHistory) -> list[int]:
    """The local activities (event ids of their markers) recorded by a workflow task whose result reached the
    workflow only in the next task: the SDK closed the task as the activity finished, recording its marker, and
    asked the server at once for another task (scheduled in the same millisecond, with no event that caused it)
    to hand the workflow the result. A replay hands it the result in the first task."""
    late = []
    for marker, following in zip(history.events, history.events[1:], strict=False):
        if (
            marker.HasField("marker_recorded_event_attributes")
            and marker.marker_recorded_event_attributes.marker_name == "core_local_activity"
            and following.HasField("workflow_task_scheduled_event_attributes")
            and following.event_time.ToNanoseconds() - marker.event_time.ToNanoseconds() < 2_000_000
        ):
            late.append(marker.event_id)
    return late
