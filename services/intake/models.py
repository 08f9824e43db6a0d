"""Intake tables and API schemas: CaseCreate in, CasePublic out, Case stored."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic import Field as PField
from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from contracts.models import CaseStatus, Coverage, Exam, Patient, ReferringPhysician, Urgency
from contracts.triage import EXAM_TYPES, Reason
from services.common.db import utcnow
from services.intake.order_reference import SYSTEM_MAX_LENGTH, SYSTEM_RULE, is_identifier_system

TABLES = (
    "cases",
    "case_timeline",
    "idempotency_keys",
    "case_documents",
    "case_questions",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "fhir_subscriptions",
    "hl7_endpoints",
    "hl7_messages",
    "hl7_attempts",
    "hl7_senders",
)


class CaseCreate(BaseModel):
    """A request for a second opinion on a diagnostic ultrasound."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "partner_case_ref": "REF-1001",
                    "partner_case_ref_system": "urn:oid:2.16.840.1.113883.19.5.1",
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

    partner_id: str | None = PField(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="omit it: a partner key creates cases for its own partner; operations keys must name one",
    )
    partner_case_ref: str | None = PField(
        default=None,
        max_length=100,
        description="your order's identifier (FHIR: ServiceRequest.identifier.value); one case per reference",
    )
    partner_case_ref_system: str | None = PField(
        default=None,
        max_length=SYSTEM_MAX_LENGTH,
        description="the namespace of partner_case_ref (FHIR: ServiceRequest.identifier.system), an absolute "
        "URI; the same reference under another system, or under none, names another order",
    )
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
    consent_on_file: bool = PField(
        default=True,
        description="the partner holds the patient's signed records-release authorization; when false the "
        "case waits in `awaiting_consent` until a `records_release_authorization` document is added",
    )

    @field_validator("partner_case_ref_system")
    @classmethod
    def _system_of_a_reference(cls, system: str | None, info: ValidationInfo) -> str | None:
        # Messages name the rule, never the value sent.
        if system is None:
            return None
        if not is_identifier_system(system):
            raise ValueError(SYSTEM_RULE)
        if "partner_case_ref" in info.data and info.data["partner_case_ref"] is None:
            raise ValueError("a system names the namespace of partner_case_ref; send partner_case_ref too")
        return system


class Case(SQLModel, table=True):
    __tablename__ = "cases"
    # A partner's own reference names one case at most, even when two requests race; the reference is its
    # value and system (migration 0006), so it also serves the search of a value under any system.
    __table_args__ = (
        UniqueConstraint(
            "partner_id", "partner_case_ref", "partner_case_ref_system", name="uq_cases_partner_ref_system"
        ),
        # The case list: one partner's cases in one status, newest first (migration 0005).
        Index("ix_cases_partner_status_created", "partner_id", "status", "created_at", "id"),
        # FHIR search: a partner's cases newest first, and by their last change (migration 0008).
        Index("ix_cases_partner_created", "partner_id", "created_at", "id"),
        Index("ix_cases_partner_updated", "partner_id", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    partner_case_ref: str | None = Field(default=None, max_length=100)
    # "" when the reference came without a system: NULLs would never collide in the unique constraint.
    partner_case_ref_system: str = Field(
        default="", max_length=SYSTEM_MAX_LENGTH, sa_column_kwargs={"server_default": ""}
    )
    status: str = Field(default=CaseStatus.INTAKE, index=True, max_length=40)
    # The `seq` of the workflow's status change `status` came from (migration 0007); None before the first.
    status_seq: int | None = None
    urgency: str = Field(max_length=20)
    subspecialty: str = Field(max_length=60)
    due_at: datetime
    request_json: str = Field(sa_column=Column(Text, nullable=False))
    workflow_started: bool = Field(default=False, index=True)
    consent_on_file: bool = Field(default=True)
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
    kind: str = Field(default="transition", max_length=20)  # "transition", "alert" or "delivery"


class TimelineEntry(BaseModel):
    status: str
    detail: str
    at: datetime
    kind: str = Field(
        default="transition",
        description="`transition` of status, an `alert` (e.g. due date moved, a report a hospital's HL7 engine "
        "rejected, a webhook that failed for good), or a `delivery` (the report filed by a hospital's HL7 interface "
        "engine, or its webhook taken by the partner's endpoint)",
    )


class ReportLinks(BaseModel):
    pdf_url: str
    fhir_url: str
    delivered_at: datetime


class CasePublic(BaseModel):
    """What a partner sees of a case: no PHI beyond what they sent, no internal fields."""

    case_id: str
    partner_id: str
    partner_case_ref: str | None
    partner_case_ref_system: str | None = None
    status: str = PField(description="a CaseStatus value, or `awaiting_consent`")
    urgency: Urgency
    subspecialty: str
    due_at: datetime
    created_at: datetime
    updated_at: datetime
    workflow_id: str
    consent_on_file: bool = True
    report: ReportLinks | None
    timeline: list[TimelineEntry]


class CasePage(BaseModel):
    """One page of cases, newest first; pass `next_cursor` as `cursor` for the next page."""

    items: list[CasePublic]
    next_cursor: str | None


class IdempotencyRecord(SQLModel, table=True):
    """The first answer to a POST with an `Idempotency-Key`, per caller; `status_code` is None while running."""

    __tablename__ = "idempotency_keys"

    owner: str = Field(primary_key=True, max_length=100)
    key: str = Field(primary_key=True, max_length=255)
    fingerprint: str = Field(max_length=64)
    status_code: int | None = None
    response_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class DocumentKind(StrEnum):
    RECORDS_RELEASE_AUTHORIZATION = "records_release_authorization"
    ORIGINAL_REPORT = "original_report"
    CLINICAL_NOTE = "clinical_note"
    LAB_RESULT = "lab_result"
    OTHER = "other"


class DocumentCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "records_release_authorization",
                    "title": "Signed records release",
                    "content_type": "application/pdf",
                    "content_base64": "JVBERi0xLjQK",
                }
            ]
        },
    )

    kind: DocumentKind
    title: str = PField(min_length=1, max_length=200)
    content_type: str = PField(pattern=r"^[a-z]+/[a-z0-9.+-]+$", max_length=100)
    content_base64: str = PField(min_length=4, max_length=14_000_000, description="at most 10 MB decoded")


class CaseDocument(SQLModel, table=True):
    __tablename__ = "case_documents"

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, foreign_key="cases.id", max_length=36)
    kind: str = Field(max_length=40)
    title: str = Field(max_length=200)
    content_type: str = Field(max_length=100)
    sha256: str = Field(max_length=64)
    size: int
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    consent_signalled_at: datetime | None = None
    added_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow)


class DocumentPublic(BaseModel):
    document_id: str
    case_id: str
    kind: DocumentKind
    title: str
    content_type: str
    sha256: str
    size: int
    created_at: datetime


class QuestionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "Is MRI needed?"}]})

    text: str = PField(min_length=3, max_length=2000)


class CaseQuestion(SQLModel, table=True):
    __tablename__ = "case_questions"

    id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, foreign_key="cases.id", max_length=36)
    text: str = Field(sa_column=Column(Text, nullable=False))
    asked_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow)


class QuestionPublic(BaseModel):
    question_id: str
    case_id: str
    created_at: datetime


class CancelRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "patient withdrew"}]}
    )

    reason: str = PField(min_length=3, max_length=500)


class ReportAmended(BaseModel):
    """The partner webhook `report.amended`: the delivered report has a new version (an addendum: an answer
    to a follow-up question or the specialist's own); fetch it again from the same URLs."""

    TYPE: ClassVar[str] = "report.amended"
    case_id: str
    report_id: str
    pdf_url: str
    fhir_url: str


class WebhookEndpoint(SQLModel, table=True):
    """Where a partner receives signed events; disabled by the partner, or automatically on HTTP 410.

    `kind` "webhook" is an endpoint registered under /v1/partners (Standard Webhooks JSON); "fhir-subscription"
    is a FHIR Subscription's rest-hook channel (services.intake.fhir_subscriptions): the same sender sends it
    FHIR notification Bundles, with the Subscription's `channel.header` values, in order."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(primary_key=True, max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    url: str = Field(max_length=2000)
    description: str = Field(default="", max_length=200)
    disabled_at: datetime | None = None
    disabled_reason: str = Field(default="", max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    kind: str = Field(default="webhook", max_length=20)
    channel_headers: str = Field(default="[]", sa_column=Column(Text, nullable=False, server_default="[]"))


class FhirSubscription(SQLModel, table=True):
    """A partner's FHIR Subscription (R5 Backport IG on R4): its rest-hook channel is the WebhookEndpoint of the
    same id. `events_since_start` numbers its event notifications (1, 2, ...), in the transaction that queues
    each, across updates; `status` is what the partner asked (requested, or off once deleted or updated off):
    active and error are read from the channel's delivery log (services.intake.fhir_subscriptions.current_status),
    from the handshake `handshake_event` names (a new one is queued when an update changes the endpoint or turns
    the subscription back on). `version_id` is meta.versionId: 1 when created, one more for each update that
    changes something."""

    __tablename__ = "fhir_subscriptions"

    id: str = Field(primary_key=True, foreign_key="webhook_endpoints.id", max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    topic: str = Field(max_length=40)  # case-status | report-ready (the canonical's last segment)
    task_statuses: str = Field(default="", max_length=300)  # comma-separated; empty: every status
    payload_content: str = Field(default="id-only", max_length=20)  # empty | id-only | full-resource
    heartbeat_seconds: int | None = None
    events_since_start: int = 0
    status: str = Field(default="requested", max_length=20)
    resource_json: str = Field(sa_column=Column(Text, nullable=False))
    last_queued_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    version_id: int = 1
    updated_at: datetime | None = None  # the last update that changed something (meta.lastUpdated)
    handshake_event: str = Field(
        default="handshake", max_length=40
    )  # source event id of the current handshake


class WebhookDelivery(SQLModel, table=True):
    """One event for one endpoint. `id` is the `webhook-id`, the same on every attempt and replay."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "source_event_id", name="uq_delivery_per_event"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    endpoint_id: str = Field(index=True, foreign_key="webhook_endpoints.id", max_length=36)
    source_event_id: str = Field(max_length=300)
    event_type: str = Field(max_length=60)
    case_id: str = Field(index=True, max_length=36)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", index=True, max_length=20)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, index=True)
    last_status_code: int | None = None
    last_error: str = Field(default="", max_length=300)
    delivered_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class WebhookAttempt(SQLModel, table=True):
    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, foreign_key="webhook_deliveries.id", max_length=40)
    at: datetime = Field(default_factory=utcnow)
    status_code: int | None = None
    error: str = Field(default="", max_length=300)
    duration_ms: int = 0


class EndpointCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://hooks.bayview.example/secondopinion", "description": "prod"}]
        },
    )

    url: str = PField(min_length=8, max_length=2000)
    description: str = PField(default="", max_length=200)


class EndpointPublic(BaseModel):
    endpoint_id: str
    partner_id: str
    url: str
    description: str
    enabled: bool
    disabled_reason: str
    created_at: datetime


class AttemptPublic(BaseModel):
    at: datetime
    status_code: int | None
    error: str
    duration_ms: int


class DeliveryPublic(BaseModel):
    webhook_id: str
    event_type: str
    case_id: str
    status: str = PField(description="pending, delivered, failed or cancelled")
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    delivered_at: datetime | None
    created_at: datetime
    history: list[AttemptPublic]


class Hl7Endpoint(SQLModel, table=True):
    """A partner's HL7 v2 interface engine (Mirth, Rhapsody, Cloverleaf) listening for ORU^R01 over MLLP:
    the integrated report is sent to it on delivery and on each later version (services.intake.hl7_out)."""

    __tablename__ = "hl7_endpoints"

    id: str = Field(primary_key=True, max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    host: str = Field(max_length=253)
    port: int
    tls: bool = True
    receiving_application: str = Field(max_length=180)  # MSH-5 (HD), as the engine expects it
    receiving_facility: str = Field(max_length=180)  # MSH-6 (HD)
    assigning_authority: str = Field(default="", max_length=180)  # PID-3.4; empty: MSH-6's
    description: str = Field(default="", max_length=200)
    disabled_at: datetime | None = None
    disabled_reason: str = Field(default="", max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


class Hl7Message(SQLModel, table=True):
    """One ORU^R01 for one endpoint, written in the transaction that delivers the report (the outbox row).
    `id` is MSH-10, the message control id: the same on every attempt and replay."""

    __tablename__ = "hl7_messages"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "source_event_id", name="uq_hl7_message_per_event"),
        Index("ix_hl7_messages_endpoint_created", "endpoint_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=20)
    endpoint_id: str = Field(index=True, foreign_key="hl7_endpoints.id", max_length=36)
    source_event_id: str = Field(max_length=300)
    case_id: str = Field(index=True, max_length=36)
    report_id: str = Field(max_length=64)
    result_status: str = Field(max_length=1)  # OBR-25 / OBX-11: F the first final, C a later version
    pdf_url: str = Field(max_length=2000)
    fhir_url: str = Field(max_length=2000)
    status: str = Field(default="pending", index=True, max_length=20)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, index=True)
    last_ack_code: str | None = Field(default=None, max_length=2)
    last_error: str = Field(default="", max_length=300)
    delivered_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    # The ORU^R01 as built at its first attempt (UTF-8 text, the PDF in base64): every retry and replay sends these
    # very bytes, so a version issued meanwhile does not change a message already sent once (it has its own C).
    payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Hl7Attempt(SQLModel, table=True):
    __tablename__ = "hl7_attempts"

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(index=True, foreign_key="hl7_messages.id", max_length=20)
    at: datetime = Field(default_factory=utcnow)
    ack_code: str | None = Field(default=None, max_length=2)  # MSA-1 of our ACK; None: none came
    error: str = Field(default="", max_length=300)
    duration_ms: int = 0


HD_RULE = r"^[^|^~\\&\r\n]{1,180}$"  # an HD value: no HL7 delimiter, no line break


class Hl7EndpointCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "host": "mllp.bayview.example",
                    "port": 6661,
                    "tls": True,
                    "receiving_application": "RIS",
                    "receiving_facility": "BAYVIEW",
                    "assigning_authority": "BAYVIEW_MRN",
                    "description": "Mirth, production channel",
                }
            ]
        },
    )

    host: str = PField(min_length=1, max_length=253, description="a DNS name or an IP address (no scheme)")
    port: int = PField(ge=1, le=65535, description="the MLLP listener's TCP port")
    tls: bool = PField(default=True, description="MLLP over TLS (required outside development)")
    receiving_application: str = PField(pattern=HD_RULE, description="MSH-5, as your engine expects it")
    receiving_facility: str = PField(pattern=HD_RULE, description="MSH-6, as your engine expects it")
    assigning_authority: str | None = PField(
        default=None, pattern=HD_RULE, description="PID-3.4 of your MRNs; default: receiving_facility"
    )
    description: str = PField(default="", max_length=200)


class Hl7EndpointPublic(BaseModel):
    endpoint_id: str
    partner_id: str
    host: str
    port: int
    tls: bool
    receiving_application: str
    receiving_facility: str
    assigning_authority: str
    description: str
    enabled: bool
    disabled_reason: str
    created_at: datetime


class Hl7AttemptPublic(BaseModel):
    at: datetime
    ack_code: str | None = PField(description="MSA-1 of the ACK to this message; null: no ACK came")
    error: str
    duration_ms: int


class Hl7MessagePublic(BaseModel):
    control_id: str = PField(description="MSH-10, the same on every attempt")
    case_id: str
    result_status: str = PField(description="OBR-25: F (the first final) or C (a later version)")
    status: str = PField(description="pending, delivered or failed")
    attempts: int
    next_attempt_at: datetime | None
    last_ack_code: str | None
    delivered_at: datetime | None
    created_at: datetime
    history: list[Hl7AttemptPublic]


class Hl7Sender(SQLModel, table=True):
    """A partner's interface engine sending orders (ORM^O01, OMG^O19) over MLLP (services.intake.hl7_in): a message
    is taken when its MSH-3 and MSH-4 and the client certificate the connection presented match one enabled
    sender (outside development); the sender's partner owns the case. `certificate_sha256` is "" only for a
    sender registered in development (plain MLLP from loopback). `default_reason` is the `reason` of an order
    whose OBR-31 names none; `exam_codes` maps OBR-4 codes to exam types (JSON object)."""

    __tablename__ = "hl7_senders"
    __table_args__ = (
        Index("ix_hl7_senders_identity", "sending_application", "sending_facility", "certificate_sha256"),
    )

    id: str = Field(primary_key=True, max_length=36)
    partner_id: str = Field(index=True, max_length=64)
    sending_application: str = Field(max_length=180)  # MSH-3 (HD namespace id)
    sending_facility: str = Field(max_length=180)  # MSH-4 (HD namespace id)
    certificate_sha256: str = Field(default="", max_length=64)  # lowercase hex; "" in development only
    default_reason: str = Field(default="", max_length=40)
    exam_codes: str = Field(default="{}", sa_column=Column(Text, nullable=False, server_default="{}"))
    description: str = Field(default="", max_length=200)
    disabled_at: datetime | None = None
    disabled_reason: str = Field(default="", max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


SHA256_HEX = r"^(?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2}$"


class Hl7SenderCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "sending_application": "MIRTH",
                    "sending_facility": "BAYVIEW",
                    "certificate_sha256": "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b",
                    "default_reason": "unclear_report",
                    "exam_codes": {"76856": "pelvic", "76805": "obstetric"},
                    "description": "Mirth, production channel",
                }
            ]
        },
    )

    sending_application: str = PField(
        pattern=HD_RULE, description="MSH-3 (its namespace id), as your engine sends it"
    )
    sending_facility: str = PField(
        pattern=HD_RULE, description="MSH-4 (its namespace id), as your engine sends it"
    )
    certificate_sha256: str | None = PField(
        default=None,
        pattern=SHA256_HEX,
        description="the SHA-256 fingerprint of the client certificate your engine presents (hex, colons allowed)",
    )
    certificate_pem: str | None = PField(
        default=None,
        max_length=20_000,
        description="or the client certificate itself (PEM); its fingerprint is computed and kept, not the PEM",
    )
    default_reason: Reason | None = PField(
        default=None, description="the case's `reason` when OBR-31 carries none of the reason codes"
    )
    exam_codes: dict[str, str] = PField(
        default_factory=dict,
        max_length=200,
        description='OBR-4 code (its identifier or alternate identifier) to exam type, e.g. {"76856": "pelvic"}',
    )
    description: str = PField(default="", max_length=200)

    @field_validator("exam_codes")
    @classmethod
    def _exam_types(cls, codes: dict[str, str]) -> dict[str, str]:
        for code, exam_type in codes.items():
            if not 1 <= len(code) <= 50 or not 1 <= len(exam_type) <= 50:
                raise ValueError("each code and exam type is 1 to 50 characters")
            if exam_type not in EXAM_TYPES:
                raise ValueError(f"an exam type must be one of: {', '.join(EXAM_TYPES)}")
        return codes


class Hl7SenderPublic(BaseModel):
    sender_id: str
    partner_id: str
    sending_application: str
    sending_facility: str
    certificate_sha256: str | None = PField(
        description="null: a development sender (plain MLLP from loopback)"
    )
    default_reason: Reason | None
    exam_codes: dict[str, str]
    description: str
    enabled: bool
    disabled_reason: str
    created_at: datetime
