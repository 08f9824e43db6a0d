"""Each kind of audit entry becomes the DICOM audit message PS3.15 A.5.3 names for it, valid against the
DICOM audit message schema (A.5.1), with the caller as the requesting participant and no PHI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.auth.atna import Source, to_dicom_audit
from services.auth.atna_forward import syslog_frame
from services.auth.models import AuditEvent
from tests.atna.schema import valid_audit_message

CASE = "4f7c1e0a-9a51-4c55-8d0e-2b1c3d4e5f60"
STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
)
SOURCE = Source(app_name="secondopinion", site_id="Bayview", host="so-records-1")


def entry(**fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "id": 7,
        "at": datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=UTC),
        "actor": "key:0123456789ab",
        "partner_id": "clinic-a",
        "role": "partner",
        "service": "intake",
        "action": "read",
        "resource": "case",
        "case_id": CASE,
        "outcome": "success",
        "network_address": "10.1.2.3",
    }
    return AuditEvent(**(values | fields))


KINDS = [
    # (what happened, the entry, EventID, EventActionCode, EventOutcomeIndicator, EventTypeCode)
    ("a case read", entry(), "110109", "R", "0", None),
    ("a case created", entry(action="create"), "110109", "C", "0", None),
    ("another partner's case refused", entry(outcome="denied", detail="another partner's case"), "110109", "R", "4", None),
    ("a case cancelled", entry(action="update", resource="case.cancel"), "110109", "U", "0", None),
    ("a document added", entry(action="create", resource="case.document", detail="report"), "110110", "C", "0", None),
    ("coverage read", entry(service="insurance", resource="coverage"), "110110", "R", "0", None),
    ("cases listed", entry(action="list", case_id=None, detail="3 cases"), "110112", "E", "0", None),
    (
        "an instance read",
        entry(service="records", resource="records.dicomweb", detail=f"study {STUDY} series {SERIES} instance {SOP}"),
        "110103",
        "R",
        "0",
        None,
    ),
    ("a DICOMweb search", entry(service="records", resource="records.dicomweb", detail=""), "110112", "E", "0", None),
    ("a STOW-RS upload", entry(service="records", resource="records.dicomweb", action="write", detail=f"study {STUDY}"), "110104", "C", "0", None),
    ("the audit log exported", entry(action="export", resource="audit", purpose="HOPERAT", case_id=None), "110101", "R", "0", None),
    (
        "no API key",
        entry(actor="anonymous", partner_id=None, role=None, action="get", resource="/v1/cases", case_id=None, outcome="denied", detail="an API key is required"),
        "110114",
        "E",
        "4",
        "110122",
    ),
    ("a role refused", entry(action="post", resource="/v1/partners", case_id=None, outcome="denied", detail="role partner may not do this"), "110113", "E", "4", "110132"),
    ("a reviewer granted", entry(actor="review", role=None, service="review", action="create", resource="case.reviewer_access", detail="spec-gyn-1 may read the case's records and report: offered"), "110113", "E", "0", "110135"),
    ("a bad webhook signature", entry(actor="webhook", role=None, action="create", resource="webhook", case_id=None, outcome="denied", detail="signature does not match"), "110113", "E", "4", "110126"),
    ("a webhook endpoint added", entry(action="create", resource="webhook-endpoint", case_id=None), "110113", "E", "0", "110128"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "audit_entry", "event_id", "action", "outcome", "type_code"), KINDS, ids=[k[0] for k in KINDS]
)
def test_each_entry_is_a_valid_dicom_audit_message_of_its_kind(
    what: str, audit_entry: AuditEvent, event_id: str, action: str, outcome: str, type_code: str | None
) -> None:
    message = valid_audit_message(to_dicom_audit(audit_entry, SOURCE))
    event = message.find("EventIdentification")
    assert event is not None
    assert (event.find("EventID").get("csd-code"), event.find("EventID").get("codeSystemName")) == (
        event_id,
        "DCM",
    )
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == (action, outcome)
    assert event.get("EventDateTime") == "2026-12-07T10:00:00.123456Z"
    assert [t.get("csd-code") for t in event.findall("EventTypeCode")] == ([type_code] if type_code else [])
    requestor, service = message.findall("ActiveParticipant")
    assert (requestor.get("UserID"), requestor.get("UserIsRequestor")) == (audit_entry.actor, "true")
    assert (requestor.get("NetworkAccessPointID"), requestor.get("NetworkAccessPointTypeCode")) == (
        "10.1.2.3",
        "2",
    )
    assert service.get("UserIsRequestor") == "false" and service.get("NetworkAccessPointID") == "so-records-1"
    source = message.find("AuditSourceIdentification")
    assert (source.get("AuditSourceID"), source.get("AuditEnterpriseSiteID")) == ("secondopinion", "Bayview")
    if audit_entry.case_id:
        [case] = [
            o
            for o in message.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectID") == f"urn:uuid:{CASE}"
        ]
        assert (
            case.get("ParticipantObjectTypeCode"),
            case.find("ParticipantObjectIDTypeCode").get("csd-code"),
        ) == ("2", "12")


def test_an_instance_read_names_its_study_by_uid_with_the_instance_and_the_caller_as_destination() -> None:
    read = entry(
        service="records", resource="records.dicomweb", detail=f"study {STUDY} series {SERIES} instance {SOP}"
    )
    message = valid_audit_message(to_dicom_audit(read, SOURCE))
    [study] = [
        o for o in message.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectID") == STUDY
    ]
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert [i.get("UID") for i in study.iter("Instance")] == [SOP]
    requestor, service = message.findall("ActiveParticipant")
    assert (
        requestor.find("RoleIDCode").get("csd-code") == "110152"
    )  # Destination: the images went to the caller
    assert service.find("RoleIDCode").get("csd-code") == "110153"


def test_the_syslog_frame_is_rfc_5425_octet_counted_rfc_5424_with_the_xml_after_a_bom() -> None:
    frame = syslog_frame(entry(), SOURCE)
    length, message = frame.split(b" ", 1)
    assert int(length) == len(message)
    header, xml = message.split(b"\xef\xbb\xbf", 1)
    assert header == b"<85>1 2026-12-07T10:00:00.123456Z so-records-1 secondopinion intake IHE+RFC-3881 - "
    valid_audit_message(xml)


def test_characters_xml_cannot_carry_are_replaced_and_the_message_stays_valid() -> None:
    """A path a client sent (kept as the refused request's resource, named as the restricted function) may hold
    control characters: written as they came, the repository got a message no XML parser accepts."""
    refused = entry(
        resource="/v1/partners/\x1b[2J\x07", case_id=None, outcome="denied", detail="role partner\x08"
    )
    message = valid_audit_message(to_dicom_audit(refused, SOURCE))
    assert message.find("EventIdentification/EventID").get("csd-code") == "110113"
    [function] = message.findall("ParticipantObjectIdentification")
    assert function.get("ParticipantObjectID") == "/v1/partners/\ufffd[2J\ufffd"


def test_the_cases_patient_is_named_by_the_facilitys_patient_id_and_nothing_else_of_the_patient() -> None:
    message = valid_audit_message(to_dicom_audit(entry(), SOURCE, patient_id="MRN-0042"))
    [patient] = [
        o
        for o in message.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCode") == "1"
    ]
    assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCodeRole")) == (
        "MRN-0042",
        "1",
    )
    assert patient.find("ParticipantObjectIDTypeCode").attrib == {
        "csd-code": "2",
        "codeSystemName": "RFC-3881",
        "originalText": "Patient Number",
    }
    assert patient.find("ParticipantObjectName") is None
