"""Replays stored histories of representative cases against today's workflow code.

A change to CaseWorkflow that would make a running case take a different path fails here. Guard such a
change with `workflow.patched("<change-id>")` (see README, "Changing the workflow"), then record new
histories with `make replay-record` and keep the old ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError, UnfinishedUpdateHandlersWarning

from services.common.config import Settings
from services.common.temporal import data_converter
from tests.replay.markers import late_local_activity_results, patches_by_task
from workflows.case import ANSWERS_IN_TURN, CaseWorkflow

HERE = Path(__file__).parent
HISTORIES = sorted((HERE / "histories").glob("*.json"))


def test_representative_histories_are_stored() -> None:
    names = {path.stem for path in HISTORIES}
    assert {"closed_after_review", "cancelled_in_review", "offer_declined_and_expired"} <= names
    # Recorded after publishing became a local activity (patch "publish-as-local-activity").
    assert {"local-publish-closed_after_review", "local-publish-cancelled_in_review"} <= names
    # Recorded after a step's status change and commands went out in one local activity
    # (patch "publish-step-at-once").
    assert {"step-at-once-closed_after_review", "step-at-once-follow_up_question"} <= names
    # Recorded after an answer was looked up after the previous answer, not after its request (patch
    # "answers-in-turn").
    assert {"answers-in-turn-closed_after_review", "answers-in-turn-follow_up_question"} <= names
    # Recorded with "offer-within-due-date", "critical-result-alert" and "deliver-own-addenda" in place.
    assert {
        "own-addenda-closed_after_review",
        "own-addenda-critical_result_alert",
        "own-addenda-urgent_offer_lapses",
    } <= names
    # Recorded after the specialist's own addendum was delivered (patch "deliver-own-addenda"), and before
    # it: a case that received report.addended and ignored it, then answered a question and closed.
    assert {"deliver-own-addenda-own_addendum", "addendum_before_deliver_own_addenda"} <= names
    # Recorded with "communication-before-report": an untold major discrepancy waiting for operations, one the
    # specialist documented, a hold and a cancel while waiting; and before it: the old code composing at once.
    assert {
        "communication-first-untold_major_discrepancy",
        "communication-first-told_major_discrepancy",
        "communication-first-hold_and_cancel_awaiting_communication",
        "untold_major_discrepancy_before_communication_first",
    } <= names
    # A case cancelled while on hold, before "cancel-ends-hold" (it ended on_hold) and with it (cancelled).
    assert {"cancelled_on_hold_before_cancel_ends_hold", "cancel-ends-hold-cancelled_on_hold"} <= names
    # A resume that releases the closing step of a case closed on hold, announced after that step went out: before
    # "decisions-finish-before-the-case-ends" the case completed first (the update failed), with it after.
    assert {
        "closed_on_hold_resumed_late_before_decisions_finish_first",
        "decisions-finish-first-closed_on_hold_resumed_late",
    } <= names
    # Recorded with "communication-reminders-back-off" (8 hourly reminders, then every 4 hours, a hold without a
    # timer) and "rematch-backs-off" (1, 2, 4, 6 hours unmatched, then an offer, then 1 hour); and an unmatched
    # case before them, matching again every hour.
    assert {
        "reminders-back-off-communication_reminders",
        "reminders-back-off-unmatched_rematch",
        "unmatched_rematch_before_backoff",
    } <= names
    # Recorded with "patches-decided-at-start" (every earlier change taken, no patch asked mid-run), one per scenario
    # of tests/integration/test_case_workflow.py; and the old code's history whose publish result came a task late.
    assert {
        "patches-at-start-closed_after_review",
        "patches-at-start-own_addendum",
        "patches-at-start-hold_and_cancel_awaiting_communication",
        "patches-at-start-unmatched_rematch_backs_off",
        "late_publish_result_before_patches_at_start",
    } <= names
    assert len([name for name in names if name.startswith("patches-at-start-")]) == 17


def test_the_old_history_is_one_whose_publish_result_reached_the_workflow_a_task_late() -> None:
    """What made it fail: the match's publish recorded by one task, its result (and the patch the workflow asked
    right after it) in the next. (That a new case asks its patches in its first task only, each case of
    tests/integration/test_case_workflow.py checks as it runs.)"""
    name = "late_publish_result_before_patches_at_start"
    history = WorkflowHistory.from_json(f"case-{name}", (HERE / "histories" / f"{name}.json").read_text())
    [late] = late_local_activity_results(history)
    completed_before = sum(
        1
        for e in history.events
        if e.event_id < late and e.HasField("workflow_task_completed_event_attributes")
    )
    assert (completed_before + 1, ANSWERS_IN_TURN) in patches_by_task(history)


RUNNERS = {"sandboxed": SandboxedWorkflowRunner, "unsandboxed": UnsandboxedWorkflowRunner}


@pytest.mark.parametrize("runner", RUNNERS, ids=list(RUNNERS))
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_without_nondeterminism(path: Path, runner: str) -> None:
    """Under the sandbox (the test suite's worker) and without it (production's worker)."""
    # The stored histories were encrypted with the development key, like every local case.
    chosen: WorkflowRunner = RUNNERS[runner]()
    replayer = Replayer(
        workflows=[CaseWorkflow], data_converter=data_converter(Settings()), workflow_runner=chosen
    )
    history = WorkflowHistory.from_json(f"case-{path.stem}", path.read_text())
    if path.stem == "late_publish_result_before_patches_at_start":
        # The replay failure PATCHES_AT_START ends for new cases: the old code asked the patch a task early.
        with pytest.raises(NondeterminismError, match="patch marker encountered for change answers-in-turn"):
            await replayer.replay_workflow(history)
        return
    if path.stem.endswith("_before_decisions_finish_first"):
        # Replayed as it ran: the case completed with the resume still running.
        with pytest.warns(UnfinishedUpdateHandlersWarning):
            await replayer.replay_workflow(history)
        return
    await replayer.replay_workflow(history)
