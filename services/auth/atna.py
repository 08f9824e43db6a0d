"""Each audit entry as a DICOM audit message (DICOM PS3.15 A.5, the XML IHE ATNA's Record Audit Event carries).

Which message an entry becomes, from what it touched and how (DICOM PS3.15 A.5.3, codes of PS3.16 CID 400-403):

| entry | message (EventID) | action |
|---|---|---|
| a case (the second-opinion order): created, read, changed or cancelled | Order Record 110109 | C R U |
| a case's records, documents, coverage, review, report | Patient Record 110110 | C R U D |
| a DICOMweb read naming a study | DICOM Instances Accessed 110103 | R |
| a DICOM upload (STOW-RS) into a case | DICOM Instances Transferred 110104 | C |
| a list or search (cases, DICOMweb QIDO) | Query 110112 | E |
| the audit log read (the FHIR AuditEvent export) | Audit Log Used 110101 | R |
| a request without a valid API key or webhook signature | User Authentication 110114 / Login 110122 | E |
| a role refused, a partner's configuration touched, a reviewer granted or revoked | Security Alert 110113 | E |

A refused access to a case (another partner's, or not the specialist's) is the message of what was tried with
EventOutcomeIndicator 4 (minor failure) and its reason: the repository's "who tried to see this order" finds it.

Participants: the caller (UserIsRequestor true; UserID its API key `key:<id>`, AlternativeUserID its partner,
the network access point its IP address as our service saw it) and our service (a process, UserIsRequestor
false, the network access point this host's name); the source (AuditSourceID the application name, the
enterprise site). Objects: the case (its id, `urn:uuid:`, as a URI), a study by its Study Instance UID (110180)
with the instance read, and the case's patient by the referring facility's patient id (Patient Number) where the
forwarder knows it (services.auth.atna_forward.patients_of). The patient's name, birth date and anything else
of the patient are never sent: the id is what the hospital's repository finds its patient's accesses by.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple
from xml.etree import ElementTree

from services.auth.fhir_audit import DICOM_READ
from services.auth.models import AuditEvent


class Code(NamedTuple):
    code: str
    system: str
    meaning: str

    def attributes(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.meaning}


AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
ORDER_RECORD = Code("110109", "DCM", "Order Record")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
OBJECT_SECURITY_CHANGED = Code("110135", "DCM", "Object Security Attributes Changed")
USER_SECURITY_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")

SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
APPLICATION = Code("110150", "DCM", "Application")

PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
SEARCH_CRITERIA = Code("10", "RFC-3881", "Search Criteria")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
APPLICATION_SERVER = Code("4", "DCM", "Application Server Process or Thread")

ACTIONS = {"create": "C", "post": "C", "read": "R", "get": "R", "update": "U", "put": "U", "patch": "U"}
ACTIONS |= {"delete": "D", "write": "U", "list": "E", "export": "R"}
OUTCOMES = {"success": "0", "denied": "4", "failed": "8"}
SECURITY_RESOURCES = {
    "webhook-endpoint": NETWORK_CONFIGURATION,
    "hl7-endpoint": NETWORK_CONFIGURATION,
    "hl7-sender": NETWORK_CONFIGURATION,
    "partner": USER_SECURITY_CHANGED,
}
REVIEWER_ACCESS = "case.reviewer_access"
ACT_REASON = "2.16.840.1.113883.5.8"  # HL7 v3 ActReason: the entry's purpose of use
PURPOSES = {"TREAT": "treatment", "HOPERAT": "healthcare operations", "HPAYMT": "healthcare payment"}


@dataclass(frozen=True)
class Source:
    """Who reports: the application's name (AuditSourceID), its enterprise site, and this host's name."""

    app_name: str = "secondopinion"
    site_id: str = ""
    host: str = socket.gethostname()


@dataclass(frozen=True)
class Kind:
    event: Code
    action: str
    type_code: Code | None = None


def kind_of(entry: AuditEvent) -> Kind:
    """Which DICOM audit message an entry is (see the module's table)."""
    action = ACTIONS.get(entry.action, "E")
    resource, outcome = entry.resource, entry.outcome
    if resource == "audit":
        return Kind(AUDIT_LOG_USED, "R")
    if resource == REVIEWER_ACCESS:
        return Kind(SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED)
    if resource in SECURITY_RESOURCES:
        return Kind(SECURITY_ALERT, "E", SECURITY_RESOURCES[resource])
    if resource in ("webhook", "hl7-order") and outcome != "success":  # a sender not recognised
        return Kind(SECURITY_ALERT, "E", NODE_AUTHENTICATION)
    if resource.startswith("/") or resource == "records.source":
        # Refused before any case was named: no valid key (401), or a role or partner refused (403).
        if entry.role is None and entry.outcome == "denied" and entry.case_id is None:
            return Kind(USER_AUTHENTICATION, "E", LOGIN)
        return Kind(SECURITY_ALERT, "E", USE_OF_RESTRICTED_FUNCTION)
    if entry.action == "list":
        return Kind(QUERY, "E")
    if resource == "records.dicomweb":
        if action != "R":  # a STOW-RS upload (check_case records any write as `write`)
            return Kind(INSTANCES_TRANSFERRED, "C")
        if DICOM_READ.match(entry.detail) is None:
            return Kind(QUERY, "E")
        return Kind(INSTANCES_ACCESSED, "R")
    if resource in ("case", "case.cancel"):
        return Kind(
            ORDER_RECORD, action if action != "E" else "R"
        )  # a cancelled order is updated, not deleted
    return Kind(PATIENT_RECORD, action if action != "E" else "R")


def _instant(at: datetime) -> str:
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _coded(parent: ElementTree.Element, tag: str, code: Code) -> None:
    ElementTree.SubElement(parent, tag, code.attributes())


def to_dicom_audit(
    entry: AuditEvent, source: Source, patient_id: str | None = None, free_text: int | None = None
) -> bytes:
    """The entry as one DICOM audit message (UTF-8 XML, no declaration: RFC 5425 carries it after a BOM);
    `patient_id`: the referring facility's id of the case's patient, named as the Patient participant;
    `free_text`: cut the free text (EventOutcomeDescription, ParticipantObjectDescription, the query asked) to
    this many characters and an ellipsis, for a message to fit a UDP datagram (identifiers are never cut)."""
    kind = kind_of(entry)
    message = ElementTree.Element("AuditMessage")
    event = ElementTree.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": kind.action,
            "EventDateTime": _instant(entry.at),
            "EventOutcomeIndicator": OUTCOMES.get(entry.outcome, "8"),
        },
    )
    _coded(event, "EventID", kind.event)
    if kind.type_code is not None:
        _coded(event, "EventTypeCode", kind.type_code)
    if entry.outcome != "success" or entry.detail:
        ElementTree.SubElement(event, "EventOutcomeDescription").text = _cut(
            entry.detail or entry.outcome, free_text
        )
    _coded(event, "PurposeOfUse", Code(entry.purpose, ACT_REASON, PURPOSES.get(entry.purpose, entry.purpose)))
    _participants(message, entry, kind, source)
    ElementTree.SubElement(
        message,
        "AuditSourceIdentification",
        {
            "AuditSourceID": source.app_name,
            **({"AuditEnterpriseSiteID": source.site_id} if source.site_id else {}),
        },
    )
    _coded(message[-1], "AuditSourceTypeCode", APPLICATION_SERVER)
    if patient_id and entry.case_id:
        _object(message, patient_id, PATIENT_NUMBER, "1", "1")
    _objects(message, entry, kind, free_text)
    for element in message.iter():  # text a client put in a URL may hold characters XML 1.0 cannot carry
        element.attrib = {name: _xml_text(value) for name, value in element.attrib.items()}
        element.text = _xml_text(element.text) if element.text is not None else None
    return ElementTree.tostring(message, encoding="utf-8", xml_declaration=False)


# Characters XML 1.0 does not allow (C0 controls other than tab, newline, return; surrogates; U+FFFE, U+FFFF).
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: str) -> str:
    return NOT_XML.sub("\ufffd", value)


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[:limit] + "\u2026"


def _participants(message: ElementTree.Element, entry: AuditEvent, kind: Kind, source: Source) -> None:
    requestor = {"UserID": entry.actor, "UserIsRequestor": "true"}
    if entry.partner_id:
        requestor["AlternativeUserID"] = entry.partner_id
    if entry.network_address:
        requestor |= {
            "NetworkAccessPointID": entry.network_address,
            "NetworkAccessPointTypeCode": "2" if _is_ip(entry.network_address) else "1",
        }
    service = {
        "UserID": f"{source.app_name}/{entry.service}",
        "UserIsRequestor": "false",
        "NetworkAccessPointID": source.host,
        "NetworkAccessPointTypeCode": "1",
    }
    # Who the data moved from and to, where the message says (Query, DICOM Instances Transferred/Accessed).
    caller_role, our_role = {
        QUERY: (SOURCE_ROLE, DESTINATION_ROLE),
        INSTANCES_TRANSFERRED: (SOURCE_ROLE, DESTINATION_ROLE),
        INSTANCES_ACCESSED: (DESTINATION_ROLE, SOURCE_ROLE),
    }.get(kind.event, (None, APPLICATION))
    caller = ElementTree.SubElement(message, "ActiveParticipant", requestor)
    if caller_role is not None:
        _coded(caller, "RoleIDCode", caller_role)
    if entry.role:
        _coded(caller, "RoleIDCode", Code(entry.role, "secondopinion-role", entry.role))
    ours = ElementTree.SubElement(message, "ActiveParticipant", service)
    _coded(ours, "RoleIDCode", our_role)


def _object(
    message: ElementTree.Element, object_id: str, id_type: Code, type_code: str, role: str
) -> ElementTree.Element:
    element = ElementTree.SubElement(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _objects(message: ElementTree.Element, entry: AuditEvent, kind: Kind, free_text: int | None) -> None:
    if kind.event == QUERY:
        query = _object(message, entry.resource, SEARCH_CRITERIA, "2", "24")
        asked = _cut(f"{entry.resource} {entry.detail}".strip(), free_text)
        ElementTree.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            asked.encode()
        ).decode()
    if kind.event == SECURITY_ALERT and kind.type_code == USE_OF_RESTRICTED_FUNCTION:
        _object(message, entry.resource, URI, "2", "13")
    if entry.case_id:
        case = _object(message, f"urn:uuid:{entry.case_id}", URI, "2", "3")
        ElementTree.SubElement(case, "ParticipantObjectDescription").text = _cut(entry.resource, free_text)
    if kind.type_code == OBJECT_SECURITY_CHANGED and entry.detail:
        granted = entry.detail.split(" ", 1)[0]
        _object(message, granted, USER_IDENTIFIER, "1", "11")
    found = DICOM_READ.match(entry.detail) if entry.resource == "records.dicomweb" else None
    if found is not None:
        study_uid, series_uid, instance_uid = found.groups()
        study = _object(message, study_uid, STUDY_INSTANCE_UID, "2", "3")
        if series_uid:
            ElementTree.SubElement(
                study, "ParticipantObjectDetail", {"type": "SeriesInstanceUID", "value": _b64(series_uid)}
            )
        if instance_uid:
            sop_class = ElementTree.SubElement(study, "SOPClass", {"NumberOfInstances": "1"})
            ElementTree.SubElement(sop_class, "Instance", {"UID": instance_uid})


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
