"""Review tables (specialists, reviews, reports) and the API schemas built from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from sqlalchemy import JSON
from sqlmodel import Field, SQLModel

from contracts.models import Exam, OriginalReport, StudySummary
from services.common.db import utcnow

TABLES = ("specialists", "reviews", "reports")

ReviewStatus = Literal["assigned", "submitted"]
TechnicalQuality = Literal["diagnostic", "limited", "non_diagnostic"]
Agreement = Literal["concordant", "minor_discrepancy", "major_discrepancy"]

ClinicalText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]
ListItem = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1_000)]


def as_utc(value: datetime) -> datetime:
    """A naive timestamp from a command is taken as UTC (the columns refuse naive datetimes)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SpecialistBase(SQLModel):
    display_name: str = Field(max_length=200)
    credentials: str = Field(max_length=100, description="e.g. 'MD, FACR'")
    npi: str = Field(max_length=10)
    subspecialties: list[str] = Field(sa_type=JSON, description="contracts.triage.Subspecialty values")
    licensed_states: list[str] = Field(sa_type=JSON)
    organization: str = Field(max_length=200)
    academic: bool = False
    max_open_reviews: int = 5
    active: bool = True


class Specialist(SpecialistBase, table=True):
    __tablename__ = "specialists"

    id: str = Field(primary_key=True, max_length=50)


class SpecialistPublic(SpecialistBase):
    id: str


class Review(SQLModel, table=True):
    __tablename__ = "reviews"

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=100)
    reviewer_id: str = Field(foreign_key="specialists.id", index=True, max_length=50)
    subspecialty: str = Field(max_length=50)
    status: str = Field(default="assigned", index=True, max_length=20)
    match_event_id: str = Field(unique=True, max_length=300, description="the review.match that created it")
    match_explanation: str
    request: dict[str, Any] = Field(sa_type=JSON, description="the MatchSpecialist command data")
    exam_type: str = Field(max_length=50)
    urgency: str = Field(max_length=20)
    due_at: datetime = Field(index=True)
    assigned_at: datetime = Field(default_factory=utcnow)

    technical_quality: str | None = Field(default=None, max_length=20)
    technical_notes: str | None = None
    agreement: str | None = Field(default=None, max_length=20)
    findings: str | None = None
    impression: str | None = None
    alternative_diagnoses: list[str] | None = Field(default=None, sa_type=JSON)
    recommendations: list[str] | None = Field(default=None, sa_type=JSON)
    new_ultrasound_needed: bool | None = None
    submitted_at: datetime | None = Field(default=None)


class Report(SQLModel, table=True):
    __tablename__ = "reports"

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(unique=True, max_length=100)
    review_id: str = Field(foreign_key="reviews.id", max_length=36)
    pdf_sha256: str = Field(max_length=64)
    pdf_path: str = Field(max_length=300, description="relative to the review service's data directory")
    diagnostic_report: dict[str, Any] = Field(sa_type=JSON, description="FHIR R4 DiagnosticReport")
    created_at: datetime = Field(default_factory=utcnow)


class ReviewFindings(BaseModel):
    """The specialist's second opinion: the body of POST /v1/reviews/{review_id}."""

    model_config = ConfigDict(extra="forbid")

    technical_quality: TechnicalQuality
    technical_notes: str | None = Field(default=None, max_length=5_000)
    agreement: Agreement
    findings: ClinicalText
    impression: ClinicalText
    alternative_diagnoses: list[ListItem] = Field(default_factory=list, max_length=20)
    recommendations: list[ListItem] = Field(min_length=1, max_length=20)
    new_ultrasound_needed: bool

    @classmethod
    def of(cls, review: Review) -> ReviewFindings | None:
        if review.status != "submitted":
            return None
        return cls.model_validate(review.model_dump(include=set(cls.model_fields)))


class WorkItem(BaseModel):
    review_id: str
    case_id: str
    status: ReviewStatus
    subspecialty: str
    exam_type: str
    clinical_question: str
    urgency: str
    due_at: datetime
    assigned_at: datetime


class ReviewDetail(WorkItem):
    """Everything the specialist reads before giving the second opinion."""

    reviewer_id: str
    reason: str
    exam: Exam
    patient_sex: str
    patient_age_years: int
    original_report: OriginalReport
    study: StudySummary
    records_url: str
    findings: ReviewFindings | None
    submitted_at: datetime | None
