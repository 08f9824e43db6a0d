"""Inputs and outputs of the case workflow's activities, signals and queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from contracts.models import CaseStatus


class PublishCommand(BaseModel):
    case_id: str
    type: str
    data: dict[str, Any]


class PublishStatus(BaseModel):
    case_id: str
    status: CaseStatus
    previous: CaseStatus | None
    at: datetime
    detail: str


class TimelineItem(BaseModel):
    status: CaseStatus
    at: datetime
    detail: str


class CaseOutcome(BaseModel):
    case_id: str
    status: CaseStatus
    reviewer_id: str | None
    report_id: str | None
