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
    warnings: list[str] = []  # technical adequacy findings for the specialist (no PHI)


class RecordsIncomplete(Event):
    """Records were checked and something is missing; drives the reminders. `missing` names items, never PHI."""

    TYPE: ClassVar[str] = "records.incomplete"
    missing: list[str]
    warnings: list[str] = []


class RecordsNeeded(Event):
    """A reminder was sent to the referring facility (relayed to the partner as the `records.needed` webhook)."""

    TYPE: ClassVar[str] = "records.needed"
    attempt: int
    missing: list[str]


class IdentityMismatch(Event):
    """An import does not match the case's patient; nothing of it is released until a human decides."""

    TYPE: ClassVar[str] = "records.identity_mismatch"
    import_id: str
    differences: list[str]  # attribute names only, e.g. ["PatientBirthDate", "PatientSex"]


class InsuranceVerified(Event):
    TYPE: ClassVar[str] = "insurance.verified"
    coverage_status: CoverageStatus
    plan_code: str | None
    cpt: str
    allowed_amount: Decimal
    patient_cost: Decimal
    currency: str = "USD"
    explanation: str
    # Da Vinci CRD-style coverage information: "no-auth" | "auth-needed" | "satisfied".
    authorization: str = "no-auth"
    network: str = "unknown"  # "in" | "out" | "unknown"
    # What the payer said, without PHI: active, inactive, plan_unknown, member_mismatch, payer_rejected,
    # payer_unavailable, malformed_response, payer_unknown, self_pay.
    outcome: str = ""
    # The estimate's parts, for showing to the patient.
    copay: Decimal | None = None
    deductible_applied: Decimal | None = None
    deductible_remaining: Decimal | None = None
    coinsurance: Decimal | None = None


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


class ReviewOffered(Event):
    TYPE: ClassVar[str] = "review.offered"
    review_id: str
    reviewer_id: str
    subspecialty: str
    explanation: str


class ReviewAccepted(Event):
    TYPE: ClassVar[str] = "review.accepted"
    review_id: str
    reviewer_id: str


class ReviewDeclined(Event):
    TYPE: ClassVar[str] = "review.declined"
    review_id: str
    reviewer_id: str
    reason: str


class ReviewSubmitted(Event):
    TYPE: ClassVar[str] = "review.submitted"
    review_id: str
    reviewer_id: str
    agreement: str
    critical: bool = False
    # The review documents who was told, how and when (None: a review service from before it said; a critical
    # result could not be submitted without one even then).
    communicated: bool | None = None


class QuestionAnswered(Event):
    """The specialist answered a follow-up question; the report has a new version with the addendum."""

    TYPE: ClassVar[str] = "review.answered"
    question_id: str
    review_id: str
    report_id: str


class ReportAddended(Event):
    """The specialist signed an addendum of their own (a correction, an additional finding, a late comparison):
    the report has a new version `version`, to be delivered like an answer's addendum."""

    TYPE: ClassVar[str] = "report.addended"
    review_id: str
    report_id: str
    addendum_id: str
    version: int


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


class CaseCancelled(Event):
    """Published by the workflow when a case is cancelled: every service withdraws its outstanding work."""

    TYPE: ClassVar[str] = "case.cancelled"
    reason: str
    cancelled_by: str


class EncapsulatedReport(Event):
    """The integrated report as a DICOM Encapsulated PDF, to be stored with the case's study by records."""

    TYPE: ClassVar[str] = "document.encapsulated_report"
    report_id: str
    version: int
    sop_instance_uid: str
    dicom_base64: str  # a Part 10 file (tens of kB): small enough to travel in the message


class CaseAlert(Event):
    """Something operations must see: a case at risk of missing its due date, a breach, an escalation,
    a due date that moved. Never hidden, never PHI."""

    TYPE: ClassVar[str] = "case.alert"
    kind: str  # "at_risk" | "breached" | "records_escalated" | "due_date_moved"
    detail: str
    at: datetime
    due_at: datetime | None = None


class CaseStatusChanged(Event):
    """The case entered `status`. `seq` numbers the case's status changes in the order the workflow made them
    (1, 2, …): two made in one workflow task (a hold and a resume) carry one `at`, and they may be applied in
    either order, so the one with the higher `seq` is the case's status. None from a worker before it."""

    TYPE: ClassVar[str] = "case.status_changed"
    status: CaseStatus
    previous: CaseStatus | None
    at: datetime
    detail: str = ""
    seq: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    e.TYPE: e
    for e in (
        RecordsAssembled,
        RecordsIncomplete,
        RecordsNeeded,
        IdentityMismatch,
        InsuranceVerified,
        ReviewAssigned,
        ReviewOffered,
        ReviewAccepted,
        ReviewDeclined,
        ReviewUnmatched,
        ReviewSubmitted,
        QuestionAnswered,
        ReportAddended,
        ReportReady,
        ReportDelivered,
        CaseStatusChanged,
        CaseCancelled,
        CaseAlert,
        EncapsulatedReport,
    )
}


class RecordsAvailable(Event):
    """A partner says records for the case can now be fetched (e.g. the study reached its PACS)."""

    TYPE: ClassVar[str] = "records.available"
    study_instance_uid: str | None = None
    endpoint: str | None = None
    note: str = ""
