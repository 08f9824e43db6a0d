"""Human decisions sent to a case workflow as Temporal updates or signals (name in each docstring).

Every decision carries who made it (`by`, a staff or partner id, never a patient's name) and why.
Clients address the workflow `case-{case_id}` by these names, so services need not import the workflow.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from contracts.models import DirectCommunication


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str = Field(
        min_length=1, max_length=100, description="who decided: a staff, partner or specialist id"
    )
    reason: str = Field(default="", max_length=500)


class CancelCase(Decision):
    """Update `cancel`: stop the case; every service withdraws its outstanding work and the partner is told."""

    reason: str = Field(min_length=3, max_length=500)


class ConsentReceived(Decision):
    """Signal `consent_received`: a records-release authorization is on file, records retrieval may start."""

    document_id: str = Field(min_length=1, max_length=100)


class CostChoice(StrEnum):
    ACCEPT = "accept"
    SELF_PAY = "self_pay"
    DECLINE = "decline"


class CostDecision(Decision):
    """Update `decide_cost`: the patient accepts the estimate, chooses self-pay, or declines (cancels)."""

    choice: CostChoice


class IdentityChoice(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"


class IdentityDecision(Decision):
    """Update `reconcile_identity`: accept an import that did not match the patient, or reject it."""

    import_id: str = Field(min_length=1, max_length=100)
    choice: IdentityChoice
    reason: str = Field(min_length=3, max_length=500)


class ReassignReviewer(Decision):
    """Update `reassign_reviewer`: withdraw the current reviewer and match again (optionally to a named one)."""

    reviewer_id: str | None = None
    reason: str = Field(min_length=3, max_length=500)


class DocumentCommunication(Decision):
    """Update `document_communication`: the referring physician (or who acts for them) was told directly of a
    critical result or major discrepancy the specialist submitted without a documented communication. The case
    waits for it (`awaiting_communication`) before the report is composed, and the report states it."""

    communication: DirectCommunication


class HoldCase(Decision):
    """Update `hold`: pause the case (timers keep counting the due date, the breach is recorded)."""

    reason: str = Field(min_length=3, max_length=500)


class ResumeCase(Decision):
    """Update `resume`: continue a case put on hold."""


class FollowUpQuestion(Decision):
    """Update `ask_question`: after delivery, a follow-up question for the same specialist (at most three)."""

    question_id: str = Field(min_length=1, max_length=100)
    text: str = Field(min_length=3, max_length=2000)


class CloseCase(Decision):
    """Update `close`: the referring physician has no further questions; close before the follow-up window ends."""
