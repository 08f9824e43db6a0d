"""Value objects shared by commands, events and the case workflow."""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints


class Strict(BaseModel):
    """Unknown fields are refused, so nothing is accepted by accident."""

    model_config = ConfigDict(extra="forbid")


def as_utc(value: datetime) -> datetime:
    """`value` in UTC, a time without an offset read as UTC; a ValueError (a 422 naming the field) for one that
    UTC cannot hold: 0001-01-01T00:00+01:00 is in year 0, 9999-12-31T23:30-01:00 in year 10000, which no
    datetime holds (comparing or storing it raised OverflowError, a 500)."""
    try:
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise ValueError(
            "is outside the years 1 to 9999 once converted to UTC; send a time within them"
        ) from None


def _held_by_utc(value: datetime) -> datetime:
    as_utc(value)
    return value  # as sent, with its offset


# A time a client sends to filter by (created_from, since): read as UTC without an offset ("2026-12-01" is its
# midnight UTC), refused when UTC cannot hold it.
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
# A time with its UTC offset, kept as sent, that UTC can hold (every report prints it in UTC).
Instant = Annotated[AwareDatetime, AfterValidator(_held_by_utc)]


class Urgency(StrEnum):
    STANDARD = "standard"
    PRIORITY = "priority"
    URGENT = "urgent"


class CaseStatus(StrEnum):
    INTAKE = "intake"
    AWAITING_CONSENT = "awaiting_consent"
    AWAITING_RECORDS = "awaiting_records"
    IDENTITY_MISMATCH = "identity_mismatch"
    AWAITING_INSURANCE = "awaiting_insurance"
    AWAITING_PATIENT_DECISION = "awaiting_patient_decision"
    MATCHING = "matching"
    UNMATCHED = "unmatched"
    AWAITING_ACCEPTANCE = "awaiting_acceptance"
    IN_REVIEW = "in_review"
    AWAITING_COMMUNICATION = "awaiting_communication"
    COMPOSING_REPORT = "composing_report"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FOLLOW_UP = "follow_up"
    ON_HOLD = "on_hold"
    CLOSED = "closed"
    CANCELLED = "cancelled"


class CoverageStatus(StrEnum):
    COVERED = "covered"
    NOT_COVERED = "not_covered"
    SELF_PAY = "self_pay"


class Sex(StrEnum):
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"
    UNKNOWN = "unknown"


class Patient(Strict):
    family_name: str = Field(min_length=1, max_length=100)
    given_name: str = Field(min_length=1, max_length=100)
    birth_date: date
    sex: Sex
    mrn: str = Field(min_length=1, max_length=64, description="the referring facility's patient id")
    state: str = Field(pattern=r"^[A-Z]{2}$", description="US state of residence, for licensure")


class ReferringPhysician(Strict):
    name: str = Field(min_length=1, max_length=200)
    npi: str = Field(pattern=r"^\d{10}$")
    organization: str = Field(min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=200)


class Exam(Strict):
    exam_type: str = Field(
        min_length=1,
        max_length=50,
        description="e.g. pelvic, obstetric, breast, thyroid, abdominal, vascular, renal, scrotal",
    )
    performed_on: date
    facility: str = Field(min_length=1, max_length=200)
    accession_number: str | None = Field(default=None, max_length=64)
    study_instance_uid: str | None = Field(default=None, pattern=r"^[0-9.]{1,64}$")
    first_reader_npi: str | None = Field(default=None, pattern=r"^\d{10}$", description="who read it first")
    first_reader_organization: str | None = Field(default=None, max_length=200)


class Coverage(Strict):
    self_pay: bool = False
    plan_code: str | None = Field(default=None, max_length=50)
    member_id: str | None = Field(default=None, max_length=50)


class OriginalReport(Strict):
    content_type: str
    sha256: str
    text: str = Field(description="the first reader's report as text (extracted from a PDF when needed)")


class StudySummary(Strict):
    study_instance_uid: str
    modality: str
    instance_count: int
    multiframe_count: int
    series_count: int


class DirectCommunication(Strict):
    """Who was told directly of a critical result or major discrepancy (`recipient`, e.g. "Dr. Alex Kim", and
    their `recipient_role`, e.g. "referring physician", "covering physician"), how (telephone or in person) and
    when (ACR Practice Parameter for Communication of Diagnostic Imaging Findings: a nonroutine communication,
    documented in the report). The shape of the review's CriticalCommunication, with the role of the person told."""

    recipient: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=200)]
    recipient_role: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=100)]
    method: Literal["telephone", "in_person"]
    at: Instant = Field(description="when they were told, with its UTC offset")
    read_back: bool = False


class DocumentedCommunication(DirectCommunication):
    """A DirectCommunication as operations documented it on the case (update `document_communication`)."""

    documented_by: str
    documented_at: datetime


class CasePolicy(Strict):
    """The programme's timers for one case, fixed when the case starts (so a running case never changes rules)."""

    records_reminder_hours: list[float] = Field(default_factory=lambda: [24.0, 72.0])
    records_escalation_hours: float = 120.0
    authorization_reminder_hours: float = 48.0
    offer_timeout_hours: float = 24.0
    rematch_after_hours: float = 1.0
    at_risk_fraction: float = Field(default=0.75, gt=0, lt=1)
    follow_up_window_days: float = 14.0
    max_follow_up_questions: int = 3


class CaseInput(Strict):
    """The workflow's input. Carries PHI: it travels only through the encrypting payload codec."""

    case_id: str
    partner_id: str
    urgency: Urgency
    subspecialty_hint: str
    due_at: datetime
    patient: Patient
    referring: ReferringPhysician
    exam: Exam
    clinical_question: str
    reason: str
    coverage: Coverage
    consent_on_file: bool = True
    procedure_scheduled_on: date | None = None
    gestational_age_weeks: int | None = None
    policy: CasePolicy = Field(default_factory=CasePolicy)
    partner_case_ref: str | None = None  # the partner's order (ServiceRequest.identifier), for the report
    partner_case_ref_system: str | None = None  # its identifier system; None: sent without one
