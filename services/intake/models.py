"""Intake tables and API schemas: CaseCreate in, CasePublic out, Case stored."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from contracts.models import CaseStatus, Coverage, Exam, Patient, ReferringPhysician, Urgency
from contracts.triage import Reason
from services.common.db import utcnow

TABLES = ("cases", "case_timeline")


class CaseCreate(BaseModel):
    """A request for a second opinion on a diagnostic ultrasound."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "partner_id": "demo-clinic",
                    "partner_case_ref": "REF-1001",
                    "patient": {
                        "family_name": "Doe",
                        "given_name": "Jane",
                        "birth_date": "1984-03-02",
                        "sex": "female",
                        "mrn": "MRN-0042",
                        "state": "CA",
                    },
                    "referring": {
                        "name": "Dr. Alex Kim",
                        "npi": "1234567893",
                        "organization": "Bayview Women's Clinic",
                    },
                    "exam": {
                        "exam_type": "pelvic",
                        "performed_on": "2026-11-20",
                        "facility": "Bayview Imaging",
                    },
                    "clinical_question": "Complex adnexal mass: benign or suspicious?",
                    "reason": "possible_malignancy",
                    "coverage": {"plan_code": "ACME-PPO", "member_id": "W123456789"},
                }
            ]
        },
    )

    partner_id: str = PField(default="direct", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    partner_case_ref: str | None = PField(default=None, max_length=100)
    patient: Patient
    referring: ReferringPhysician
    exam: Exam
    clinical_question: str = PField(min_length=3, max_length=2000)
    reason: Reason
    coverage: Coverage = PField(default_factory=lambda: Coverage(self_pay=True))
    procedure_scheduled_on: date | None = PField(
        default=None, description="date of an invasive procedure planned on the strength of the first scan"
    )
    gestational_age_weeks: int | None = PField(default=None, ge=0, le=45)


class Case(SQLModel, table=True):
    __tablename__ = "cases"
    # A partner's own reference names one case at most, even when two requests race.
    __table_args__ = (UniqueConstraint("partner_id", "partner_case_ref", name="uq_cases_partner_ref"),)

    id: str = Field(primary_key=True, max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    partner_case_ref: str | None = Field(default=None, max_length=100)
    status: str = Field(default=CaseStatus.INTAKE, index=True, max_length=40)
    urgency: str = Field(max_length=20)
    subspecialty: str = Field(max_length=60)
    due_at: datetime
    request_json: str = Field(sa_column=Column(Text, nullable=False))
    workflow_started: bool = Field(default=False, index=True)
    report_pdf_url: str | None = None
    report_fhir_url: str | None = None
    delivered_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)


class CaseTimelineEntry(SQLModel, table=True):
    __tablename__ = "case_timeline"

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(index=True, foreign_key="cases.id", max_length=36)
    event_id: str = Field(unique=True, max_length=300)
    status: str = Field(max_length=40)
    detail: str = ""
    at: datetime


class TimelineEntry(BaseModel):
    status: str
    detail: str
    at: datetime


class ReportLinks(BaseModel):
    pdf_url: str
    fhir_url: str
    delivered_at: datetime


class CasePublic(BaseModel):
    """What a partner sees of a case: no PHI beyond what they sent, no internal fields."""

    case_id: str
    partner_id: str
    partner_case_ref: str | None
    status: CaseStatus
    urgency: Urgency
    subspecialty: str
    due_at: datetime
    created_at: datetime
    updated_at: datetime
    workflow_id: str
    report: ReportLinks | None
    timeline: list[TimelineEntry]
