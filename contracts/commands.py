"""Commands the case workflow publishes on exchange `case.commands`; the routing key is `TYPE`."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from pydantic import BaseModel

from contracts.models import (
    Coverage,
    Exam,
    OriginalReport,
    Patient,
    ReferringPhysician,
    StudySummary,
    Urgency,
)


class Command(BaseModel):
    TYPE: ClassVar[str]
    case_id: str


class CollectRecords(Command):
    TYPE: ClassVar[str] = "records.collect"
    patient: Patient
    exam: Exam
    partner_id: str | None = None


class RemindRecords(Command):
    """The workflow's reminder timer fired: ask the referring facility again for what is missing."""

    TYPE: ClassVar[str] = "records.remind"
    attempt: int


class ReconcileIdentity(Command):
    """A human decided an identity mismatch: `accept` releases the import under our patient, `reject` discards it."""

    TYPE: ClassVar[str] = "records.reconcile"
    import_id: str
    decision: str  # "accept" | "reject"
    decided_by: str
    reason: str


class VerifyInsurance(Command):
    TYPE: ClassVar[str] = "insurance.verify"
    coverage: Coverage
    patient_state: str
    cpt: str = "76140"


class MatchSpecialist(Command):
    TYPE: ClassVar[str] = "review.match"
    exam: Exam
    patient: Patient
    referring: ReferringPhysician
    urgency: Urgency
    subspecialty_hint: str
    clinical_question: str
    reason: str
    due_at: datetime
    original_report: OriginalReport
    study: StudySummary
    exclude_reviewers: list[str] = []


class WithdrawOffer(Command):
    """The offer expired, the reviewer was reassigned or the case was cancelled: the review leaves the worklist."""

    TYPE: ClassVar[str] = "review.withdraw"
    review_id: str
    reason: str  # "expired" | "reassigned" | "cancelled"


class ComposeReport(Command):
    TYPE: ClassVar[str] = "report.compose"
    review_id: str


class DeliverReport(Command):
    TYPE: ClassVar[str] = "report.deliver"
    report_id: str
    pdf_url: str
    fhir_url: str


COMMAND_TYPES: dict[str, type[Command]] = {
    c.TYPE: c
    for c in (
        CollectRecords,
        RemindRecords,
        ReconcileIdentity,
        VerifyInsurance,
        MatchSpecialist,
        WithdrawOffer,
        ComposeReport,
        DeliverReport,
    )
}
