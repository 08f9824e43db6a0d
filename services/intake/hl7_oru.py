"""The integrated report as an HL7 v2.5.1 ORU^R01 (unsolicited observation result), and the ACK to one.

Segments: MSH, PID, ORC, OBR, an OBX of type FT with the report's conclusion (when the report has one) and an
OBX of type ED with the signed PDF (base64). The message is UTF-8 (MSH-18 `UNICODE UTF-8`), segments end in
CR, and every value is escaped (`escape`): the delimiters `| ^ & ~ \\` as `\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`, a line
break in the conclusion as `\\.br\\` (FT formatting), in any other field as a space. python-hl7's
`hl7.util.escape` is not used for it: it writes every non-ASCII character as `\\Xhh\\` of its code point, which
a receiver reading UTF-8 (MSH-18) decodes as other bytes, so a patient named Zoë would arrive misspelled.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

import hl7

from contracts.models import Patient, Sex

FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT = "|", "^", "~", "\\", "&"
ENCODING_CHARACTERS = COMPONENT + REPETITION + ESCAPE + SUBCOMPONENT
SENDING_APPLICATION = "SECONDOPINION"
SENDING_FACILITY = "SECONDOPINION"
VERSION = "2.5.1"
CHARACTER_SET = "UNICODE UTF-8"
SEX = {Sex.FEMALE: "F", Sex.MALE: "M", Sex.OTHER: "O", Sex.UNKNOWN: "U"}  # HL7 table 0001
LOINC = "LN"
SERVICE_CODE = "18748-4"  # LOINC: Diagnostic imaging study (as the FHIR DiagnosticReport.code)
IMPRESSION_CODE = "19005-8"  # LOINC: Radiology Imaging study [Impression] (narrative)
DELIVERED = ("AA", "CA")  # MSA-1: application accept, commit accept
REJECTED = ("AR", "CR")  # MSA-1: application reject, commit reject (AE, CE: error)
_ESCAPES = {
    ESCAPE: "\\E\\",
    FIELD: "\\F\\",
    COMPONENT: "\\S\\",
    SUBCOMPONENT: "\\T\\",
    REPETITION: "\\R\\",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def escape(value: str, *, formatted: bool = False) -> str:
    """`value` as an HL7 field value: delimiters escaped; a line break is FT's `\\.br\\` when `formatted`, a
    space otherwise; other control characters (which would end a segment or an MLLP block) a space."""
    escaped = "".join(_ESCAPES.get(c, c) for c in value)
    escaped = _LINE_BREAK.sub("\\\\.br\\\\" if formatted else " ", escaped)
    return _CONTROL.sub(" ", escaped)


def timestamp(moment: datetime) -> str:
    """DTM to the second, with its UTC offset: YYYYMMDDHHMMSS+0000."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def day(value: date) -> str:
    return value.strftime("%Y%m%d")


@dataclass(frozen=True)
class Interpreter:
    """The specialist who signed the report (OBR-32): as the report names them, with their NPI if known."""

    name: str
    npi: str | None = None


@dataclass(frozen=True)
class OruReport:
    """What one ORU^R01 says."""

    control_id: str  # MSH-10
    created_at: datetime  # MSH-7: when the message was queued (the same on every attempt)
    receiving_application: str
    receiving_facility: str
    assigning_authority: str  # PID-3.4
    patient: Patient
    placer_order: str | None  # the partner's case reference (ORC-2, OBR-2)
    case_id: str  # our case id (ORC-3, OBR-3)
    exam_type: str
    performed_on: date  # OBR-7
    issued: datetime  # OBR-22, OBX-14
    result_status: str  # OBR-25, OBX-11: F or C
    interpreter: Interpreter | None
    conclusion: str | None
    pdf: bytes
    processing_id: str = "P"


def oru_r01(report: OruReport) -> bytes:
    """The message, segments joined by CR, encoded as UTF-8 (no MLLP framing)."""
    status = report.result_status
    placer = f"{escape(report.placer_order)}^{SENDING_FACILITY}" if report.placer_order else ""
    filler = f"{escape(report.case_id)}^{SENDING_FACILITY}"
    patient = report.patient
    service = f"{SERVICE_CODE}^{escape(f'Second opinion: {report.exam_type} ultrasound')}^{LOINC}"
    segments = [
        segment(
            "MSH",
            ENCODING_CHARACTERS,
            SENDING_APPLICATION,
            SENDING_FACILITY,
            escape(report.receiving_application),
            escape(report.receiving_facility),
            timestamp(report.created_at),
            "",
            "ORU^R01^ORU_R01",
            escape(report.control_id),
            report.processing_id,
            VERSION,
            "",
            "",
            "",  # MSH-15, MSH-16 empty: original-mode acknowledgment (an AA, AE or AR on the same connection)
            "",
            "",
            CHARACTER_SET,
        ),
        segment(
            "PID",
            "1",
            "",
            f"{escape(patient.mrn)}^^^{escape(report.assigning_authority)}^MR",
            "",
            f"{escape(patient.family_name)}^{escape(patient.given_name)}",
            "",
            day(patient.birth_date),
            SEX[patient.sex],
        ),
        segment("ORC", "RE", placer, filler, "", "CM"),
        segment(
            "OBR",
            "1",
            placer,
            filler,
            service,
            "",
            "",
            day(report.performed_on),
            *[""] * 14,  # OBR-8 to OBR-21
            timestamp(report.issued),
            "",
            "US",
            status,
            *[""] * 6,  # OBR-26 to OBR-31
            interpreter(report.interpreter),
        ),
    ]
    n = 0
    if report.conclusion:
        n += 1
        segments.append(
            observation(n, "FT", f"{IMPRESSION_CODE}^Impression^{LOINC}", escape(report.conclusion, formatted=True),
                        status, report.issued)
        )  # fmt: skip
    n += 1
    pdf = base64.b64encode(report.pdf).decode("ascii")
    segments.append(
        observation(n, "ED", f"{SERVICE_CODE}^Second opinion report (PDF)^{LOINC}",
                    f"^application^pdf^Base64^{pdf}", status, report.issued)
    )  # fmt: skip
    return "\r".join(segments).encode("utf-8") + b"\r"


def segment(name: str, *fields: str) -> str:
    if name == "MSH":  # MSH-1 is the field separator itself: MSH-2 follows it directly
        return "MSH" + FIELD + FIELD.join(fields)
    return FIELD.join((name, *fields)).rstrip(FIELD)


def observation(n: int, value_type: str, code: str, value: str, status: str, at: datetime) -> str:
    return segment(
        "OBX", str(n), value_type, code, "", value, "", "", "", "", "", status, "", "", timestamp(at)
    )


def interpreter(who: Interpreter | None) -> str:
    """OBR-32 (NDL): its first component a CNN, written in subcomponents: ID (the NPI), the name as the
    report prints it (family name's place: the report does not split it), and NPI as assigning authority."""
    if who is None:
        return ""
    parts = [escape(who.npi or ""), escape(who.name), "", "", "", "", "", "", "NPI" if who.npi else ""]
    return SUBCOMPONENT.join(parts).rstrip(SUBCOMPONENT)


@dataclass(frozen=True)
class Ack:
    """MSA-1 and MSA-2 of an answer: its code and the control id of the message it acknowledges."""

    code: str
    control_id: str


def read_ack(block: bytes) -> Ack | None:
    """The MSA of an answer (python-hl7 parses it); None when it is not an HL7 message with an MSA."""
    try:
        message = hl7.parse(block.decode("utf-8", errors="replace"))
        msa = message.segment("MSA")
        return Ack(code=str(msa[1]).strip().upper(), control_id=message.unescape(str(msa[2])).strip())
    except (hl7.ParseException, KeyError, IndexError, ValueError):
        return None
