"""Events the services publish on exchange `case.events`; the routing key is `TYPE`."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel

from contracts.models import CaseStatus, CoverageStatus, OriginalReport, StudySummary


class Event(BaseModel):
    TYPE: ClassVar[str]
    case_id: str


class RecordsAssembled(Event):
    TYPE: ClassVar[str] = "records.assembled"
    report: OriginalReport
    study: StudySummary
    file_count: int


class InsuranceVerified(Event):
    TYPE: ClassVar[str] = "insurance.verified"
    coverage_status: CoverageStatus
    plan_code: str | None
    cpt: str
    allowed_amount: Decimal
    patient_cost: Decimal
    currency: str = "USD"
    explanation: str


class ReviewAssigned(Event):
    TYPE: ClassVar[str] = "review.assigned"
    review_id: str
    reviewer_id: str
    subspecialty: str
    explanation: str


class ReviewUnmatched(Event):
    TYPE: ClassVar[str] = "review.unmatched"
    subspecialty: str
    reason: str


class ReviewSubmitted(Event):
    TYPE: ClassVar[str] = "review.submitted"
    review_id: str
    reviewer_id: str
    agreement: str


class ReportReady(Event):
    TYPE: ClassVar[str] = "report.ready"
    report_id: str
    pdf_url: str
    fhir_url: str
    sha256: str


class ReportDelivered(Event):
    TYPE: ClassVar[str] = "report.delivered"
    report_id: str
    recipient: str
    delivered_at: datetime


class CaseStatusChanged(Event):
    TYPE: ClassVar[str] = "case.status_changed"
    status: CaseStatus
    previous: CaseStatus | None
    at: datetime
    detail: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    e.TYPE: e
    for e in (
        RecordsAssembled,
        InsuranceVerified,
        ReviewAssigned,
        ReviewUnmatched,
        ReviewSubmitted,
        ReportReady,
        ReportDelivered,
        CaseStatusChanged,
    )
}
