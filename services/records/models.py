"""Records tables and API schemas: RecordRequest, RecordImport and RecordFile stored, *Public out."""

from __future__ import annotations

import ipaddress
import re
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
from pydantic import BaseModel, field_validator, model_validator
from pydantic import Field as PydanticField
from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.db import utcnow
from services.records.dicom_tls import missing_settings

TABLES = (
    "record_requests",
    "record_imports",
    "record_files",
    "record_sources",
    "record_retrievals",
    "record_report_returns",
    "record_commitment_requests",
)


class FileKind(StrEnum):
    REPORT = "report"
    DICOM = "dicom"
    CLINICAL = "clinical"  # notes, lab and pathology results (FHIR Observation, DocumentReference)
    DICOMDIR = "dicomdir"  # an IHE PDI index: checked, never stored


class RecordsStatus(StrEnum):
    REQUESTED = "requested"
    ASSEMBLED = "assembled"
    CANCELLED = "cancelled"


class ImportStatus(StrEnum):
    RELEASED = "released"
    IDENTITY_MISMATCH = "identity_mismatch"
    REJECTED = "rejected"
    # Our own report, come while the case's images wait for an identity decision: not handed out until it is
    # placed into their study after the decision (report_study.py), so its UID never has two identities.
    AWAITING_PLACEMENT = "awaiting_placement"


class RecordRequest(SQLModel, table=True):
    """The workflow asked for this case's records; `assembled_at` is set once, when the set is complete."""

    __tablename__ = "record_requests"

    case_id: str = Field(primary_key=True, max_length=64)
    patient: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    exam: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    partner_id: str | None = Field(default=None, max_length=100)
    requested_at: datetime = Field(default_factory=utcnow)
    assembled_at: datetime | None = None
    cancelled_at: datetime | None = None
    reminders_sent: int = 0
    last_reminded_at: datetime | None = None
    adequacy: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    @property
    def status(self) -> RecordsStatus:
        if self.cancelled_at is not None:
            return RecordsStatus.CANCELLED
        return RecordsStatus.REQUESTED if self.assembled_at is None else RecordsStatus.ASSEMBLED


class RecordImport(SQLModel, table=True):
    """One upload of images (IHE IRWF): released under our patient, or held for a human decision."""

    __tablename__ = "record_imports"

    import_id: str = Field(primary_key=True, max_length=64)
    case_id: str = Field(index=True, max_length=64, foreign_key="record_requests.case_id")
    source: str = Field(max_length=32)
    status: str = Field(max_length=32)
    differences: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    decided_at: datetime | None = None
    decided_by: str | None = Field(default=None, max_length=200)


class RecordFile(SQLModel, table=True):
    """One stored file of a case; the same content is kept once per case."""

    __tablename__ = "record_files"
    __table_args__ = (UniqueConstraint("case_id", "sha256", name="uq_record_files_case_sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(index=True, max_length=64, foreign_key="record_requests.case_id")
    import_id: str | None = Field(default=None, max_length=64, foreign_key="record_imports.import_id")
    released: bool = True
    kind: str = Field(max_length=16)
    sha256: str = Field(max_length=64)
    content_type: str = Field(max_length=100)
    size_bytes: int = Field(sa_type=BigInteger)
    storage_path: str = Field(max_length=200, description="relative to the records store root")
    study_instance_uid: str | None = Field(default=None, max_length=64)
    series_instance_uid: str | None = Field(default=None, max_length=64)
    sop_instance_uid: str | None = Field(default=None, max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    number_of_frames: int | None = None
    sop_class_uid: str | None = Field(default=None, max_length=64)
    study_date: str | None = Field(default=None, max_length=8)
    has_regions: bool | None = None
    burned_in_annotation: str | None = Field(default=None, max_length=8)
    view_label: str | None = Field(default=None, max_length=200)
    record_type: str | None = Field(default=None, max_length=40)
    record_date: date | None = None
    created_at: datetime = Field(default_factory=utcnow)


class RetrievalStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


def retry_or_fail(row: Any, attempts: int, backoff_seconds: float) -> bool:
    """After a failed attempt of a retrieval, a report return or a commitment answer: pending again after an
    exponential backoff (a PACS down for maintenance gets time to come back) while attempts remain (True), else
    failed (False)."""
    if row.attempts < attempts:
        row.status = RetrievalStatus.PENDING
        row.next_attempt_at = utcnow() + timedelta(seconds=backoff_seconds * 2 ** (row.attempts - 1))
        return True
    row.status, row.finished_at = RetrievalStatus.FAILED, utcnow()
    return False


def _pattern(regex: str) -> dict[str, str]:
    # SQLModel's `regex=` is pydantic v1's name: pydantic v2 ignores it, so nothing was checked ("ftp://x" was
    # taken as a DICOMweb URL and every retrieval from it failed). `pattern` is what v2 validates.
    return {"pattern": regex}


class RecordSourceBase(SQLModel):
    """Where a partner's images can be fetched: a DIMSE PACS (AE title, host, port) or a DICOMweb base URL."""

    ae_title: str | None = Field(
        default=None, min_length=1, max_length=16, schema_extra=_pattern(r"^[ -~]*[!-~][ -~]*$")
    )
    host: str | None = Field(default=None, min_length=1, max_length=253)
    port: int | None = Field(default=None, ge=1, le=65535)
    retrieve_method: str = Field(default="c-get", max_length=8, schema_extra=_pattern(r"^(c-get|c-move)$"))
    dicomweb_url: str | None = Field(
        default=None, max_length=500, schema_extra=_pattern(r"^https?://[^\s/]+[^\s]*$")
    )
    dicomweb_auth_env: str | None = Field(
        default=None,
        max_length=100,
        schema_extra=_pattern(r"^[A-Z][A-Z0-9_]*$"),
        description="name of an environment variable holding user:password for basic auth (never the secret)",
    )
    return_reports: bool = Field(
        default=False,
        description="send each version of the second-opinion report (DICOM Encapsulated PDF) back into this "
        "PACS, into the study it reads: C-STORE to the AE above, or STOW-RS to the DICOMweb URL",
    )
    storage_commitment: bool = Field(
        default=False,
        description="this PACS speaks DICOM Storage Commitment (Push Model, PS3.4 Annex J): each report sent back "
        "by C-STORE is asked to be committed (N-ACTION), and counts as returned only once the PACS's N-EVENT-REPORT "
        "says it took responsibility for it; without it a report C-STOREd is done when stored",
    )
    tls: bool = Field(
        default=False,
        description="speak DICOM over TLS to the AE above (PS3.15 Annex B, BCP 195; port 2762 by convention)",
    )
    tls_ca_path: str | None = Field(
        default=None,
        max_length=500,
        description="PEM CA bundle that signed the PACS's certificate (required with tls), a file in the records "
        "service's RECORDS_DICOM_TLS_DIR (a relative path is read there)",
    )
    tls_cert_path: str | None = Field(
        default=None,
        max_length=500,
        description="our client certificate (PEM, in RECORDS_DICOM_TLS_DIR), for a PACS requiring mutual TLS",
    )
    tls_key_path: str | None = Field(
        default=None,
        max_length=500,
        description="the private key (PEM, unencrypted) of tls_cert_path: a path, the key itself is never stored",
    )
    tls_server_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="the name the PACS's certificate must carry; the host when not given",
    )


class RecordSource(RecordSourceBase, table=True):
    __tablename__ = "record_sources"

    partner_id: str = Field(primary_key=True, max_length=100)
    updated_at: datetime = Field(default_factory=utcnow)


# Labels of 1-63 letters, digits, hyphens (and underscores, which container and Windows names carry).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


class RecordSourceIn(RecordSourceBase):
    model_config = {"extra": "forbid"}  # type: ignore[assignment]

    @field_validator("host", "tls_server_name")
    @classmethod
    def _host_name_or_address(cls, host: str | None) -> str | None:
        """A DNS name (labels of at most 63 letters, digits and hyphens) or an IP address: anything else never
        resolves, and a label past 63 characters cannot even be looked up (idna)."""
        if host is not None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not HOST_NAME.fullmatch(host):
                    raise ValueError("is neither a host name nor an IP address") from None
        return host

    @model_validator(mode="after")
    def _usable_tls(self) -> RecordSourceIn:
        """A TLS source names its CA bundle, and its client certificate with its key (the files themselves are
        checked by the route, which knows where they are kept)."""
        paths = (self.tls_ca_path, self.tls_cert_path, self.tls_key_path, self.tls_server_name)
        if not self.tls:
            if any(paths):
                raise ValueError("tls_* settings are given but tls is false; set tls: true to use them")
            return self
        if not (self.ae_title and self.host):
            raise ValueError("tls applies to a DIMSE PACS: give ae_title, host and port with it")
        problems = missing_settings(self.tls_ca_path, self.tls_cert_path, self.tls_key_path)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _commitment_over_dimse(self) -> RecordSourceIn:
        """Storage commitment is DIMSE (N-ACTION, N-EVENT-REPORT): it needs the PACS's AE, host and port."""
        if self.storage_commitment and not (self.ae_title and self.host):
            raise ValueError(
                "storage_commitment applies to a DIMSE PACS: give ae_title, host and port with it "
                "(STOW-RS has no storage commitment)"
            )
        return self

    @field_validator("dicomweb_url")
    @classmethod
    def _callable_url(cls, url: str | None) -> str | None:
        """A URL the retrieval can call: "http://[::1" or a port past 65535 pass the pattern, and every
        retrieval from them failed before it began (httpx.InvalidURL)."""
        if url is not None:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL:
                parsed = None
            if (
                parsed is None
                or not parsed.host
                or not 0 < (parsed.port if parsed.port is not None else 80) < 65536
            ):
                raise ValueError("is not a URL that can be called; check the host and the port")
        return url


class RecordSourcePublic(RecordSourceBase):
    partner_id: str
    updated_at: datetime


class RecordRetrieval(SQLModel, table=True):
    """A query/retrieve of the case's study from the partner's PACS, retried with backoff, then reported."""

    __tablename__ = "record_retrievals"

    retrieval_id: str = Field(primary_key=True, max_length=64)
    case_id: str = Field(index=True, max_length=64, foreign_key="record_requests.case_id")
    partner_id: str = Field(max_length=100)
    status: str = Field(max_length=16, index=True)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_error: str | None = Field(default=None, max_length=300)
    study_instance_uid: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None  # when the current (or last) attempt began
    finished_at: datetime | None = None


class ReportReturn(SQLModel, table=True):
    """A version of the second-opinion report to be sent back into the facility's PACS, retried with backoff."""

    __tablename__ = "record_report_returns"

    return_id: str = Field(primary_key=True, max_length=64)  # the report instance's SOP Instance UID
    case_id: str = Field(index=True, max_length=64)
    partner_id: str = Field(max_length=100)
    sha256: str = Field(max_length=64)  # the instance in the object store
    version: int = 1
    status: str = Field(max_length=16, index=True)  # a RetrievalStatus
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_error: str | None = Field(default=None, max_length=300)
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    sent_sop_instance_uid: str | None = Field(default=None, max_length=64)  # the instance the PACS got
    # Storage commitment (when the source asks for it): the transaction of the current attempt, and its state.
    transaction_uid: str | None = Field(default=None, max_length=64, unique=True)
    commitment: str | None = Field(default=None, max_length=16)  # a Commitment
    committed_at: datetime | None = None


class Commitment(StrEnum):
    """Where a report return's storage commitment stands (none when the PACS is not asked)."""

    REQUESTED = "requested"  # the PACS accepted the N-ACTION; its N-EVENT-REPORT is awaited
    COMMITTED = "committed"  # the PACS took responsibility for the instance: the return is done
    NOT_COMMITTED = (
        "not_committed"  # a failure or no answer in time (last_error says which): sent again or failed
    )


class ReportReturnPublic(BaseModel):
    sop_instance_uid: str
    version: int
    status: RetrievalStatus = PydanticField(
        description="done: stored in the PACS, and committed by it when its source asks for storage commitment"
    )
    attempts: int
    last_error: str | None
    finished_at: datetime | None
    commitment: Commitment | None = PydanticField(
        default=None, description="storage commitment of the instance, when the source asks for it"
    )
    commitment_transaction_uid: str | None = None
    committed_at: datetime | None = None

    @classmethod
    def of(cls, row: ReportReturn) -> ReportReturnPublic:
        return cls(
            sop_instance_uid=row.sent_sop_instance_uid or row.return_id,  # what the PACS holds, once sent
            version=row.version,
            status=RetrievalStatus(row.status),
            attempts=row.attempts,
            last_error=row.last_error,
            finished_at=row.finished_at,
            commitment=Commitment(row.commitment) if row.commitment else None,
            commitment_transaction_uid=row.transaction_uid if row.commitment else None,
            committed_at=row.committed_at,
        )


class CommitmentRequest(SQLModel, table=True):
    """A facility's PACS asked us (N-ACTION) to commit instances it sent: answered by N-EVENT-REPORT from a
    background loop, retried, so that a restart between the request and the answer loses nothing."""

    __tablename__ = "record_commitment_requests"

    transaction_uid: str = Field(primary_key=True, max_length=64)
    calling_ae: str = Field(max_length=16)
    partner_id: str = Field(max_length=100)  # the image source whose PACS asked, and is answered
    # [[SOP Class UID, SOP Instance UID], ...] as the request listed them.
    references: list[list[str]] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(max_length=16, index=True)  # a RetrievalStatus
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_error: str | None = Field(default=None, max_length=300)
    committed: int | None = None  # how many were committed, and how many not, in the answer sent
    failed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class RetrievalPublic(BaseModel):
    retrieval_id: str
    status: RetrievalStatus
    attempts: int
    last_error: str | None
    study_instance_uid: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: RecordRetrieval) -> RetrievalPublic:
        return cls.model_validate(row, from_attributes=True)


class RecordFilePublic(BaseModel):
    sha256: str
    kind: FileKind
    content_type: str
    size_bytes: int
    modality: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    number_of_frames: int | None = None
    record_type: str | None = None
    record_date: date | None = None

    @classmethod
    def of(cls, row: RecordFile) -> RecordFilePublic:
        return cls.model_validate(row, from_attributes=True)


class ImportPublic(BaseModel):
    import_id: str
    source: str
    status: ImportStatus
    differences: list[str]
    created_at: datetime
    decided_at: datetime | None = None

    @classmethod
    def of(cls, row: RecordImport) -> ImportPublic:
        return cls.model_validate(row, from_attributes=True)


class RecordsPublic(BaseModel):
    case_id: str
    status: RecordsStatus
    missing: list[str]
    warnings: list[str] = []
    adequacy: dict[str, Any] | None = None
    assembled_at: datetime | None
    imports: list[ImportPublic] = []
    retrievals: list[RetrievalPublic] = []
    files: list[RecordFilePublic]
    # The second-opinion report's versions sent back into the facility's PACS (when its source asks).
    report_returns: list[ReportReturnPublic] = []


class UploadPublic(BaseModel):
    case_id: str
    status: RecordsStatus
    import_id: str | None = None
    import_status: ImportStatus | None = None
    missing: list[str]
    new_files: int
    duplicates: int
    files: list[RecordFilePublic]
    warnings: list[str] = PydanticField(
        default_factory=list,
        description="what of the upload was not imported and why, by position, never by path or name (an "
        'archive entry that is not a regular file: "member 3 of 9 of file 1 of 1 is a symbolic link ...")',
    )


class DicomWorkstation(SQLModel, table=True):
    """A diagnostic workstation allowed to query and retrieve over DIMSE (qr_scp.py), bound to one principal:
    configured by operations (`PUT /v1/records/workstations/{ae_title}`), or in RECORDS_QR_WORKSTATIONS."""

    __tablename__ = "record_dicom_workstations"

    ae_title: str = Field(primary_key=True, max_length=16)
    host: str = Field(max_length=253)
    port: int | None = None
    tls: bool = False
    certificate_cn: str | None = Field(default=None, max_length=64)
    role: str = Field(max_length=16)
    specialist_id: str | None = Field(default=None, max_length=100)
    partner_id: str | None = Field(default=None, max_length=100)
    updated_at: datetime = Field(default_factory=utcnow)
