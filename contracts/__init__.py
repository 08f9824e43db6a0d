"""The published language of the platform: envelope, commands, events, enums. No I/O here."""

from contracts.commands import (
    COMMAND_TYPES,
    CollectRecords,
    ComposeReport,
    DeliverReport,
    MatchSpecialist,
    VerifyInsurance,
)
from contracts.envelope import CloudEvent, new_event
from contracts.events import (
    EVENT_TYPES,
    CaseStatusChanged,
    InsuranceVerified,
    RecordsAssembled,
    ReportDelivered,
    ReportReady,
    ReviewAssigned,
    ReviewSubmitted,
    ReviewUnmatched,
)
from contracts.models import (
    CaseInput,
    CaseStatus,
    Coverage,
    CoverageStatus,
    Exam,
    OriginalReport,
    Patient,
    ReferringPhysician,
    StudySummary,
    Urgency,
)

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "CaseInput",
    "CaseStatus",
    "CaseStatusChanged",
    "CloudEvent",
    "CollectRecords",
    "ComposeReport",
    "Coverage",
    "CoverageStatus",
    "DeliverReport",
    "Exam",
    "InsuranceVerified",
    "MatchSpecialist",
    "OriginalReport",
    "Patient",
    "RecordsAssembled",
    "ReferringPhysician",
    "ReportDelivered",
    "ReportReady",
    "ReviewAssigned",
    "ReviewSubmitted",
    "ReviewUnmatched",
    "StudySummary",
    "Urgency",
    "VerifyInsurance",
    "new_event",
]
