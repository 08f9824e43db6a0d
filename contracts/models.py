"""Value objects shared by commands, events and the case workflow."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown fields are refused, so nothing is accepted by accident."""

    model_config = ConfigDict(extra="forbid")


class Urgency(StrEnum):
    STANDARD = "standard"
    PRIORITY = "priority"
    URGENT = "urgent"


class CaseStatus(StrEnum):
    INTAKE = "intake"
    AWAITING_RECORDS = "awaiting_records"
    AWAITING_INSURANCE = "awaiting_insurance"
    MATCHING = "matching"
    UNMATCHED = "unmatched"
    IN_REVIEW = "in_review"
    COMPOSING_REPORT = "composing_report"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
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


Money = Decimal
