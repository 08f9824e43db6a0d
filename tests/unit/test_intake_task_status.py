"""The FHIR Task of a case follows its status with the R4 Task state machine: paused states are on-hold,
a delivered report is completed (follow-up questions do not reopen the Task)."""

from __future__ import annotations

import pytest

from contracts.models import CaseStatus
from services.intake.fhir_task import task_status

R4_TASK_STATUSES = {
    "draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
    "in-progress", "on-hold", "failed", "completed", "entered-in-error",
}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "task"),
    [
        ("on_hold", "on-hold"),
        ("identity_mismatch", "on-hold"),
        ("awaiting_patient_decision", "on-hold"),
        ("awaiting_consent", "on-hold"),
        ("awaiting_communication", "on-hold"),
        ("awaiting_acceptance", "accepted"),
        ("delivered", "completed"),
        ("follow_up", "completed"),
        ("closed", "completed"),
        ("cancelled", "cancelled"),
    ],
)
def test_each_case_status_has_its_task_status(status: str, task: str) -> None:
    assert task_status(status) == task


def test_every_case_status_maps_to_an_r4_task_status() -> None:
    assert {task_status(s.value) for s in CaseStatus} <= R4_TASK_STATUSES
