"""Inputs and outputs of the case workflow's activities, signals and queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from contracts.models import CaseStatus


class PublishCommand(BaseModel):
    case_id: str
    type: str
    data: dict[str, Any]


class PublishEvent(BaseModel):
    """An event the workflow itself announces on `case.events` (status changes, alerts, cancellation)."""

    case_id: str
    type: str
    data: dict[str, Any]


class Outgoing(BaseModel):
    """One message of a `PublishBatch`: an event for `case.events` or a command for `case.commands`."""

    kind: Literal["event", "command"]
    type: str
    data: dict[str, Any]


class PublishBatch(BaseModel):
    """What one step of a case announces and asks for, published in this order by one local activity."""

    case_id: str
    messages: list[Outgoing]


class TimelineItem(BaseModel):
    """One line of the case's history: a status `transition`, or a `note` / `alert` in the current status."""

    status: CaseStatus
    at: datetime
    detail: str
    kind: str = "transition"


class DecisionRecord(BaseModel):
    """Audit of a human decision: who, what, why, when, and whether it was applied."""

    name: str
    by: str
    reason: str
    at: datetime
    detail: str = ""


class AlertRecord(BaseModel):
    kind: str
    at: datetime
    detail: str


class CaseOutcome(BaseModel):
    case_id: str
    status: CaseStatus
    reviewer_id: str | None
    report_id: str | None


class ReviewAssignment(BaseModel):
    """Who holds the case's current offer or review (ids only)."""

    review_id: str
    reviewer_id: str
    accepted: bool
