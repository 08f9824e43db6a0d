"""bench.server_work reads the Temporal server's own counters from one scrape of its metrics endpoint."""

from __future__ import annotations

from bench.server_work import COUNTERS, ServerWork, read_counters

# Lines as `temporal server start-dev --metrics-port` serves them (trimmed to the families read).
SCRAPE = """\
# HELP service_requests service_requests counter
# TYPE service_requests counter
service_requests{namespace="default",operation="RespondWorkflowTaskCompleted",service_name="frontend"} 902
service_requests{namespace="default",operation="RespondWorkflowTaskCompleted",service_name="history"} 902
service_requests{namespace="default",operation="SignalWorkflowExecution",service_name="frontend"} 652
service_requests{namespace="other",operation="SignalWorkflowExecution",service_name="frontend"} 40
service_requests{namespace="default",operation="UpdateWorkflowExecution",service_name="frontend"} 183
service_requests{namespace="default",operation="PollWorkflowTaskQueue",service_name="frontend"} 5000
# HELP persistence_requests persistence_requests counter
# TYPE persistence_requests counter
persistence_requests{namespace="default",operation="CreateWorkflowExecution",service_name="history"} 104
persistence_requests{namespace="default",operation="UpdateWorkflowExecution",service_name="history"} 2212
persistence_requests{namespace="temporal_system",operation="CreateWorkflowExecution",service_name="history"} 2
persistence_requests{namespace="default",operation="GetWorkflowExecution",service_name="history"} 64
# HELP visibility_persistence_requests visibility_persistence_requests counter
# TYPE visibility_persistence_requests counter
visibility_persistence_requests{operation="UpsertWorkflowExecution",service_name="history"} 743
visibility_persistence_requests{operation="RecordWorkflowExecutionStarted",service_name="history"} 104
"""


def test_counts_the_frontend_requests_and_the_writes_of_one_namespace() -> None:
    counts = read_counters(SCRAPE, "default")
    assert counts == {
        "workflow tasks": 902,  # the history service's own count of the same requests is not added
        "signals": 652,  # the other namespace's 40 are not ours
        "updates": 183,
        "queries": 0,
        "polls": 5000,
        "history writes": 104 + 2212,  # creates and updates of workflows; reads and temporal_system left out
        "visibility writes": 743 + 104,  # the visibility store has no namespace label: all of it
    }
    assert list(counts) == list(COUNTERS)


def test_side_by_side_shows_each_counter_for_every_measurement_in_order() -> None:
    case = dict.fromkeys(COUNTERS, 0.0) | {"workflow tasks": 10.4, "visibility writes": 9}
    bare = dict.fromkeys(COUNTERS, 0.0) | {"workflow tasks": 3, "visibility writes": 2}
    line = ServerWork.side_by_side(case, bare)
    assert line.startswith("workflow tasks 10.4 | 3, signals 0 | 0")
    assert line.endswith("visibility writes 9 | 2")
