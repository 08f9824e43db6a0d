"""Review tables (specialists, reviews, reports) and the API schemas built from them."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, model_validator
from sqlalchemy import JSON, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from contracts.models import Exam, Instant, OriginalReport, StudySummary
from services.common.db import utcnow
from services.review.recommendations import RecommendationItem, describe
from services.review.report_fonts import describe_characters, unprintable

TABLES = ("specialists", "reviews", "reports", "follow_up_questions", "addenda", "reviewer_access_changes")

ReviewStatus = Literal["offered", "accepted", "submitted", "declined", "withdrawn"]
# Reviews that count against a specialist's capacity and show in their worklist by default.
OPEN_STATUSES = ("offered", "accepted")
WORKLIST_STATUSES = ("offered", "accepted", "submitted")
TechnicalQuality = Literal["diagnostic", "limited", "non_diagnostic"]
Agreement = Literal["concordant", "minor_discrepancy", "major_discrepancy"]
# RADPEER (ACR, 2016 revision, J Am Coll Radiol 2017;14:1080-1086): 1 concur; 2 discrepancy, not ordinarily
# expected to be made (understandable miss); 3 discrepancy, should be made most of the time; a/b = unlikely /
# likely to be clinically significant. Score 4 was retired in 2016 (stored 4a/4b: migrate to 3a/3b).
RadpeerScore = Literal["1", "2a", "2b", "3a", "3b"]
# Why a specialist adds to a report they signed, without being asked.
AddendumKind = Literal["correction", "additional_finding", "late_comparison", "other"]

# Ultrasound risk-stratification lexicons: the categories each defines and the exams it applies to.
LexiconSystem = Literal["o_rads_us_2022", "acr_ti_rads", "bi_rads_us", "li_rads_us_2017"]
LEXICON_CATEGORIES: dict[str, tuple[str, ...]] = {
    "o_rads_us_2022": ("0", "1", "2", "3", "4", "5"),
    "acr_ti_rads": ("TR1", "TR2", "TR3", "TR4", "TR5"),
    "bi_rads_us": ("0", "1", "2", "3", "4A", "4B", "4C", "5", "6"),
    "li_rads_us_2017": ("US-1", "US-2", "US-3"),
}
LEXICON_EXAMS: dict[str, tuple[str, ...]] = {
    "o_rads_us_2022": ("pelvic", "transvaginal"),
    "acr_ti_rads": ("thyroid", "neck"),
    "bi_rads_us": ("breast",),
    "li_rads_us_2017": ("liver", "abdominal"),
}
# ACR TI-RADS (Tessler et al., JACR 2017): points summed over five feature categories.
TI_RADS_POINTS: dict[str, tuple[int, int]] = {
    "TR1": (0, 1),
    "TR2": (2, 2),
    "TR3": (3, 3),
    "TR4": (4, 6),
    "TR5": (7, 14),
}

ClinicalText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]
ListItem = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1_000)]


def unprintable_problem(text: str) -> str | None:
    """Why the report cannot carry `text` as written (a character none of its fonts draws), or None."""
    if chars := unprintable(text):
        return (
            f"has {describe_characters(chars)}, which the report cannot print; "
            "write it in words (or leave it out) and send again"
        )
    return None


def _printable(text: str) -> str:
    if problem := unprintable_problem(text):
        raise ValueError(problem)
    return text


# What a specialist signs after the report was issued (an answer, an addendum): refused unless it can be printed.
SignedText = Annotated[ClinicalText, AfterValidator(_printable)]


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
    payer_networks: list[str] = Field(default_factory=list, sa_type=JSON, description="plan codes in network")
    out_of_office: list[dict[str, str]] = Field(
        default_factory=list, sa_type=JSON, description="[{'start': ISO date, 'end': ISO date}], inclusive"
    )

    def away_between(self, start: date, end: date) -> tuple[date, date] | None:
        """The first out-of-office period that overlaps [start, end], if any."""
        for period in self.out_of_office:
            away_from, away_to = date.fromisoformat(period["start"]), date.fromisoformat(period["end"])
            if away_from <= end and away_to >= start:
                return away_from, away_to
        return None


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
    status: str = Field(default="offered", index=True, max_length=20)
    match_event_id: str = Field(unique=True, max_length=300, description="the review.match that created it")
    match_explanation: str
    request: dict[str, Any] = Field(sa_type=JSON, description="the MatchSpecialist command data")
    exam_type: str = Field(max_length=50)
    urgency: str = Field(max_length=20)
    due_at: datetime = Field(index=True)
    assigned_at: datetime = Field(default_factory=utcnow, description="when the offer was made")
    accepted_at: datetime | None = None
    declined_at: datetime | None = None
    decline_reason: str | None = Field(default=None, max_length=500)
    withdrawn_at: datetime | None = None
    withdrawn_reason: str | None = Field(default=None, max_length=20)
    draft: dict[str, Any] | None = Field(default=None, sa_type=JSON, description="unsubmitted findings")

    technical_quality: str | None = Field(default=None, max_length=20)
    technical_notes: str | None = None
    agreement: str | None = Field(default=None, max_length=20)
    findings: str | None = None
    impression: str | None = None
    alternative_diagnoses: list[str] | None = Field(default=None, sa_type=JSON)
    recommendations: list[str | dict[str, Any]] | None = Field(
        default=None, sa_type=JSON, description="strings, or services.review.recommendations.Recommendation"
    )
    new_ultrasound_needed: bool | None = None
    radpeer_score: str | None = Field(default=None, max_length=2)
    patient_answers: str | None = None
    assessments: list[dict[str, Any]] | None = Field(default=None, sa_type=JSON)
    critical_result: bool = False
    communication: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    submitted_at: datetime | None = Field(default=None)
    # The signature block as the directory had it at submission: the signed report prints this, not the
    # directory's current entry. None on reviews submitted before the copy was kept.
    signed_name: str | None = Field(default=None, max_length=200)
    signed_credentials: str | None = Field(default=None, max_length=100)
    signed_npi: str | None = Field(default=None, max_length=10)
    case_cancelled_at: datetime | None = Field(
        default=None, description="the case was cancelled (a submitted review stands, but takes no addendum)"
    )
    case_closed_at: datetime | None = Field(
        default=None, description="the case closed after follow-up: nothing more is delivered, no addendum"
    )


class Report(SQLModel, table=True):
    __tablename__ = "reports"
    # FHIR search of a partner's reports, newest first, and by its order (migration 0011).
    __table_args__ = (
        Index("ix_reports_partner_created", "partner_id", "created_at", "id"),
        Index("ix_reports_partner_order", "partner_id", "order_value"),
    )

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(unique=True, max_length=100)
    review_id: str = Field(foreign_key="reviews.id", max_length=36)
    pdf_sha256: str = Field(max_length=64)
    pdf_path: str = Field(max_length=300, description="relative to the review service's data directory")
    diagnostic_report: dict[str, Any] = Field(sa_type=JSON, description="FHIR R4 DiagnosticReport")
    created_at: datetime = Field(default_factory=utcnow)
    version: int = Field(default=1, description="1 as composed, +1 per addendum")
    updated_at: datetime | None = None
    # The case delivers the specialist's own addenda (its report.compose said so); else they are refused.
    own_addenda_delivered: bool = False
    communication: dict[str, Any] | None = Field(
        default=None,
        sa_type=JSON,
        description="contracts.models.DocumentedCommunication: who was told of a critical result or major "
        "discrepancy the review did not document, as operations documented it on the case (its report.compose)",
    )
    # The case's partner and its order (ServiceRequest.identifier: value, system "" when sent without one), as
    # the match said (Review.request): what a FHIR search of DiagnosticReport reads (migration 0011).
    partner_id: str | None = Field(default=None, max_length=64)
    order_value: str | None = Field(default=None, max_length=100)
    order_system: str | None = Field(default=None, max_length=255)


class FollowUpQuestion(SQLModel, table=True):
    """A follow-up question after delivery, for the specialist who reviewed the case; its answer is an addendum."""

    __tablename__ = "follow_up_questions"

    id: str = Field(primary_key=True, max_length=100, description="the workflow's question id")
    case_id: str = Field(primary_key=True, max_length=100)
    review_id: str = Field(foreign_key="reviews.id", index=True, max_length=36)
    text: str
    asked_by: str = Field(max_length=100)
    asked_at: datetime = Field(default_factory=utcnow)
    status: str = Field(default="open", max_length=20, description="open | answered | withdrawn")
    answer: str | None = None
    answered_at: datetime | None = None


class ReviewAddendum(SQLModel, table=True):
    """An addendum the specialist signed on their own after the report was issued; it makes a new version."""

    __tablename__ = "addenda"
    __table_args__ = (UniqueConstraint("review_id", "idempotency_key", name="uq_addenda_review_key"),)

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=100)
    review_id: str = Field(foreign_key="reviews.id", index=True, max_length=36)
    kind: str = Field(max_length=30, description="AddendumKind")
    text: str
    signed_at: datetime = Field(default_factory=utcnow)
    report_version: int = Field(description="the report version this addendum made")
    # The client's Idempotency-Key, if it sent one: a repeated POST answers this addendum, signs none.
    idempotency_key: str | None = Field(default=None, max_length=255)


class ReviewerAccessChange(SQLModel, table=True):
    """A specialist's reviews of a case changed in a way that may change their access to its PHI, noted in the
    change's transaction; deleted once the auth registry has been settled to match (services.review.access)."""

    __tablename__ = "reviewer_access_changes"

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(max_length=100)
    specialist_id: str = Field(max_length=50)
    noted_at: datetime = Field(default_factory=utcnow)


class RiskAssessment(BaseModel):
    """One lesion's category in a lexicon, as the second reader assigns it."""

    model_config = ConfigDict(extra="forbid")

    system: LexiconSystem
    category: str = Field(max_length=4)
    lesion: str | None = Field(default=None, max_length=200, description="e.g. 'right ovary', 'nodule 1'")
    points: int | None = Field(default=None, ge=0, le=14, description="ACR TI-RADS total points")
    visualization: Literal["A", "B", "C"] | None = Field(default=None, description="LI-RADS US score")

    @model_validator(mode="after")
    def fits_lexicon(self) -> RiskAssessment:
        allowed = LEXICON_CATEGORIES[self.system]
        if self.category not in allowed:
            raise ValueError(f"{self.system} categories are {', '.join(allowed)}")
        if (self.system == "acr_ti_rads") != (self.points is not None):
            raise ValueError("points are given for ACR TI-RADS, and only for it")
        if self.points is not None:
            low, high = TI_RADS_POINTS[self.category]
            if not low <= self.points <= high:
                raise ValueError(f"{self.category} is {low}-{high} points, not {self.points}")
        if (self.system == "li_rads_us_2017") != (self.visualization is not None):
            raise ValueError("a visualization score (A, B, C) is given for LI-RADS US, and only for it")
        return self


class CriticalCommunication(BaseModel):
    """Who was told of a critical result or significant discrepancy, how and when (ACR Practice Parameter for
    Communication of Diagnostic Imaging Findings: nonroutine communication, documented in the report)."""

    model_config = ConfigDict(extra="forbid")

    recipient: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=200)]
    method: Literal["telephone", "in_person"]
    at: Instant
    read_back: bool = False


class ReviewFindings(BaseModel):
    """The specialist's second opinion: the body of POST /v1/reviews/{review_id}."""

    model_config = ConfigDict(extra="forbid")

    technical_quality: TechnicalQuality
    technical_notes: str | None = Field(default=None, max_length=5_000)
    agreement: Agreement
    findings: ClinicalText
    impression: ClinicalText
    alternative_diagnoses: list[ListItem] = Field(default_factory=list, max_length=20)
    recommendations: list[RecommendationItem] = Field(
        min_length=1,
        max_length=20,
        description='a string, or {"text", "follow_up": {"action", "when": {"unit", "value", "up_to"}}}',
    )
    new_ultrasound_needed: bool
    radpeer_score: RadpeerScore | None = Field(
        default=None, description="quality assurance only, never shown to the patient"
    )
    patient_answers: str | None = Field(
        default=None, max_length=20_000, description="answers to the patient's own questions"
    )
    assessments: list[RiskAssessment] = Field(default_factory=list, max_length=10)
    critical_result: bool = Field(
        default=False,
        description="needs action now (e.g. torsion, ectopic, a discrepancy before a procedure)",
    )
    communication: CriticalCommunication | None = None

    @model_validator(mode="after")
    def score_fits_agreement(self) -> ReviewFindings:
        if self.radpeer_score is not None and (self.radpeer_score == "1") != (self.agreement == "concordant"):
            raise ValueError("radpeer_score 1 means concordant, and a discrepancy needs a score of 2a to 3b")
        return self

    def submission_problems(self, exam_type: str) -> list[tuple[str, str]]:
        """(field, message) for combinations a radiologist must not sign; checked at submission only, so
        findings stored before a rule was added stay readable."""
        problems: list[tuple[str, str]] = []
        for i, a in enumerate(self.assessments):
            if exam_type.lower() not in LEXICON_EXAMS[a.system]:
                exams = ", ".join(LEXICON_EXAMS[a.system])
                problems.append((f"assessments.{i}.system", f"{a.system} applies to {exams} exams"))
        score = self.radpeer_score
        if score and self.agreement == "major_discrepancy" and not score.endswith("b"):
            problems.append(
                ("radpeer_score", "a major discrepancy is likely clinically significant: 2b or 3b")
            )
        if self.critical_result and self.communication is None:
            problems.append(("communication", "a critical result needs who was told, how and when"))
        if score and self.agreement == "minor_discrepancy" and score.endswith("b"):
            problems.append(
                ("agreement", "a discrepancy likely to be clinically significant (2b, 3b) is major")
            )
        for field, text in self._texts():
            if problem := unprintable_problem(text):
                problems.append((field, problem))
        return problems

    def _texts(self) -> list[tuple[str, str]]:
        """(field, text) for everything written here that the report prints."""
        texts = [(field, getattr(self, field)) for field in ("technical_notes", "findings", "impression")]
        texts += [(f"alternative_diagnoses.{i}", d) for i, d in enumerate(self.alternative_diagnoses)]
        texts += [(f"recommendations.{i}", describe(r)) for i, r in enumerate(self.recommendations)]
        texts.append(("patient_answers", self.patient_answers))
        texts += [(f"assessments.{i}.lesion", a.lesion) for i, a in enumerate(self.assessments)]
        if self.communication is not None:
            texts.append(("communication.recipient", self.communication.recipient))
        return [(field, text) for field, text in texts if text]

    @classmethod
    def of(cls, review: Review) -> ReviewFindings | None:
        if review.status != "submitted":
            return None
        return cls.model_validate(review.model_dump(include=set(cls.model_fields)))


class ReviewDraft(BaseModel):
    """PUT /v1/reviews/{review_id}/draft: any part of the findings, validated only at submission."""

    model_config = ConfigDict(extra="forbid")

    technical_quality: TechnicalQuality | None = None
    technical_notes: str | None = Field(default=None, max_length=5_000)
    agreement: Agreement | None = None
    findings: str | None = Field(default=None, max_length=20_000)
    impression: str | None = Field(default=None, max_length=20_000)
    alternative_diagnoses: list[ListItem] | None = Field(default=None, max_length=20)
    recommendations: list[RecommendationItem] | None = Field(default=None, max_length=20)
    new_ultrasound_needed: bool | None = None
    radpeer_score: RadpeerScore | None = None
    patient_answers: str | None = Field(default=None, max_length=20_000)
    assessments: list[RiskAssessment] | None = Field(default=None, max_length=10)
    critical_result: bool | None = None
    communication: CriticalCommunication | None = None


class Decline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500)]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: SignedText


class AddendumCreate(BaseModel):
    """POST /v1/reviews/{review_id}/addenda: what the specialist adds to the report they signed."""

    model_config = ConfigDict(extra="forbid")

    kind: AddendumKind = "other"
    text: SignedText


class AddendumPublic(BaseModel):
    addendum_id: str
    kind: AddendumKind
    text: str
    signed_at: datetime
    report_version: int

    @classmethod
    def of(cls, a: ReviewAddendum) -> AddendumPublic:
        return cls(
            addendum_id=a.id,
            kind=a.kind,  # type: ignore[arg-type]
            **a.model_dump(include={"text", "signed_at", "report_version"}),
        )


class QuestionPublic(BaseModel):
    question_id: str
    text: str
    asked_by: str
    asked_at: datetime
    status: str
    answer: str | None
    answered_at: datetime | None

    @classmethod
    def of(cls, q: FollowUpQuestion) -> QuestionPublic:
        return cls(
            question_id=q.id,
            **q.model_dump(include={"text", "asked_by", "asked_at", "status", "answer", "answered_at"}),
        )


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
    open_questions: int = 0


class ReviewDetail(WorkItem):
    """Everything the specialist reads before giving the second opinion."""

    reviewer_id: str
    reason: str
    procedure_scheduled_on: date | None
    gestational_age_weeks: int | None
    exam: Exam
    patient_sex: str
    patient_age_years: int
    original_report: OriginalReport
    study: StudySummary
    records_url: str
    adequacy_warnings: list[str]
    dicomweb_study_url: str
    match_explanation: str
    findings: ReviewFindings | None
    draft: ReviewDraft | None
    submitted_at: datetime | None
    accepted_at: datetime | None
    declined_at: datetime | None
    decline_reason: str | None
    withdrawn_at: datetime | None
    withdrawn_reason: str | None
    questions: list[QuestionPublic]
    addenda: list[AddendumPublic] = []
