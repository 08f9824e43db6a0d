"""Commands the case workflow publishes on exchange `case.commands`; the routing key is `TYPE`."""

from __future__ import annotations

from datetime import date, datetime
from typing import ClassVar

from pydantic import BaseModel

from contracts.models import (
    Coverage,
    DocumentedCommunication,
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
    partner_id: str | None = None  # the case's partner: its key may read the coverage
    # The patient as the subscriber: the payer matches name and birth date (X12 270 loop 2100C).
    patient: Patient | None = None


class WithdrawOffer(Command):
    """The offer expired, the reviewer was reassigned or the case was cancelled: the review leaves the worklist."""

    TYPE: ClassVar[str] = "review.withdraw"
    review_id: str
    reason: str  # "expired" | "reassigned" | "cancelled"


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
    preferred_reviewer: str | None = None  # operations reassigned the case to this specialist
    plan_code: str | None = None  # the patient's plan, to prefer specialists in its network
    adequacy_warnings: list[str] = []  # records' technical adequacy findings, shown to the specialist
    partner_id: str | None = None  # the case's partner: its key may read the report
    partner_case_ref: str | None = None  # the partner's order: the report's basedOn names it
    partner_case_ref_system: str | None = None  # its identifier system; None: sent without one
    procedure_scheduled_on: date | None = (
        None  # an invasive procedure planned on the strength of the first scan
    )
    gestational_age_weeks: int | None = None  # obstetric and fetal cases (required at intake)
    # The offer or review the workflow withdrew just before this match (it lapsed, or was reassigned), also sent
    # alone as review.withdraw ahead of it: another replica may apply this match first, and then it withdraws it
    # too, in the match's transaction, so no second specialist is offered the case while the first holds it.
    withdraw: WithdrawOffer | None = None


class FollowUpQuestionForReviewer(Command):
    """After delivery, a follow-up question for the specialist who reviewed the case; answered as an addendum."""

    TYPE: ClassVar[str] = "review.question"
    question_id: str
    text: str
    asked_by: str
    review_id: str | None = None  # the delivered review; the case's submitted review when absent


class CloseReview(Command):
    """The case closed: nothing more is delivered for it, so the review's report takes no more addenda."""

    TYPE: ClassVar[str] = "review.close"
    reason: str
    # How many of the specialist's own addenda the case delivered; any signed beyond them came too late to be
    # delivered, and operations are told (None: a sender that did not count).
    own_addenda_delivered: int | None = None


class ComposeReport(Command):
    TYPE: ClassVar[str] = "report.compose"
    review_id: str
    # The case that sends it delivers the specialist's own addenda (report.addended); False from cases that
    # began before it did (their report takes no own addendum: it would never reach the physician).
    own_addenda_delivered: bool = False
    # Who was told of a critical result or major discrepancy the specialist submitted without saying so, as
    # operations documented it on the case; the report states it. None: the review documents it, or none was due.
    communication: DocumentedCommunication | None = None


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
        FollowUpQuestionForReviewer,
        CloseReview,
        ComposeReport,
        DeliverReport,
    )
}
