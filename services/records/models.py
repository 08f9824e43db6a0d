"""Records tables and API schemas: RecordRequest and RecordFile stored, *Public out."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.db import utcnow

TABLES = ("record_requests", "record_files")


class FileKind(StrEnum):
    REPORT = "report"
    DICOM = "dicom"


class RecordsStatus(StrEnum):
    REQUESTED = "requested"
    ASSEMBLED = "assembled"


class RecordRequest(SQLModel, table=True):
    """The workflow asked for this case's records; `assembled_at` is set once, when the set is complete."""

    __tablename__ = "record_requests"

    case_id: str = Field(primary_key=True, max_length=64)
    patient: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    exam: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    requested_at: datetime = Field(default_factory=utcnow)
    assembled_at: datetime | None = None

    @property
    def status(self) -> RecordsStatus:
        return RecordsStatus.REQUESTED if self.assembled_at is None else RecordsStatus.ASSEMBLED


class RecordFile(SQLModel, table=True):
    """One stored file of a case; the same content is kept once per case."""

    __tablename__ = "record_files"
    __table_args__ = (UniqueConstraint("case_id", "sha256", name="uq_record_files_case_sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(index=True, max_length=64, foreign_key="record_requests.case_id")
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
    created_at: datetime = Field(default_factory=utcnow)


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

    @classmethod
    def of(cls, row: RecordFile) -> RecordFilePublic:
        return cls.model_validate(row, from_attributes=True)


class RecordsPublic(BaseModel):
    case_id: str
    status: RecordsStatus
    missing: list[str]
    assembled_at: datetime | None
    files: list[RecordFilePublic]


class UploadPublic(BaseModel):
    case_id: str
    status: RecordsStatus
    missing: list[str]
    new_files: int
    duplicates: int
    files: list[RecordFilePublic]
