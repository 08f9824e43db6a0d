"""A hospital's order as HL7 v2 (ORM^O01, v2.3 to 2.5.1, or OMG^O19, v2.5.1) read into a CaseCreate, and the ACK
answered to it.

The message is parsed with python-hl7; each value is split on the message's own delimiters (MSH-1, MSH-2) and
unescaped here (`unescape`): python-hl7's `unescape` reads `\\Xhh\\` as Latin-1 code points, so a name escaped as
UTF-8 bytes would arrive misspelled (hl7_oru says the same of its `escape`). One order per message: the first
ORC with its OBR. Field by field (docs/partners.md, "HL7 v2 orders in", has the table):

- ORC-1: NW (new order) or CA (cancel); ORC-2 / OBR-2 the placer order number (EI): partner_case_ref, its
  universal id (EI.3, of type ISO or URI) partner_case_ref_system
- PID-3 (the CX of type MR, else the first) mrn; PID-5 family / given; PID-7 birth date; PID-8 sex; PID-11.4 state
- ORC-12 / OBR-16 (the XCN whose assigning authority or identifier type is NPI) referring name and NPI; ORC-21 /
  MSH-4 the referring organization and the exam's facility
- OBR-4 exam type (the sender's code map, else a word of its text); OBR-7 performed_on; OBR-31 and the order's
  NTEs the clinical question; an OBR-31 code that is a `reason` value, else the sender's default, the reason
- an OBX of the order coded LOINC 49051-6 the gestational age in weeks (obstetric and fetal cases need it)
- IN1-2 / IN1-36 plan code / member id; no IN1: self pay

A problem is an `OrderInvalid` of `ErrorItem`s: an ERR segment each, with its location (ERR-2, e.g. `PID^1^7`),
its HL7 table 0357 code (ERR-3) and what to fix (ERR-8), never the value sent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import hl7
from pydantic import ValidationError

from contracts.models import Sex
from contracts.triage import EXAM_TYPES, Reason
from services.intake.hl7_oru import (
    CHARACTER_SET,
    ENCODING_CHARACTERS,
    SENDING_APPLICATION,
    SENDING_FACILITY,
    escape,
    segment,
    timestamp,
)
from services.intake.models import CaseCreate
from services.intake.order_reference import is_identifier_system

# HL7 table 0357, message error condition codes.
REQUIRED_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_VERSION = "203"
APPLICATION_ERROR = "207"
CODE_TEXT = {
    REQUIRED_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_VERSION: "Unsupported version id",
    APPLICATION_ERROR: "Application internal error",
}
UNPARSEABLE = (hl7.ParseException, AssertionError, IndexError, KeyError, TypeError, ValueError)
REASONS = frozenset(r.value for r in Reason)
MESSAGE_TYPES = {("ORM", "O01"), ("OMG", "O19")}
VERSIONS = {"2.3", "2.3.1", "2.4", "2.5", "2.5.1"}
SEX = {"F": Sex.FEMALE, "M": Sex.MALE, "O": Sex.OTHER, "A": Sex.OTHER, "U": Sex.UNKNOWN, "N": Sex.UNKNOWN}
NPI_OID = "2.16.840.1.113883.4.6"
GESTATIONAL_AGE_LOINC = "49051-6"
# Words of an OBR-4 text read as an exam type (each exam type is read as itself too).
EXAM_WORDS = {
    "pelvis": "pelvic",
    "gyn": "pelvic",
    "gynecologic": "pelvic",
    "ob": "obstetric",
    "obstetrical": "obstetric",
    "pregnancy": "obstetric",
    "abdomen": "abdominal",
    "kidney": "renal",
    "kidneys": "renal",
    "scrotum": "scrotal",
    "testicular": "scrotal",
    "doppler": "vascular",
    "msk": "musculoskeletal",
}

# Where each CaseCreate field comes from, to name it (ERR-2) when the model refuses its value.
SOURCES = {
    "patient.family_name": "PID^1^5^1",
    "patient.given_name": "PID^1^5^2",
    "patient.birth_date": "PID^1^7",
    "patient.sex": "PID^1^8",
    "patient.mrn": "PID^1^3^1",
    "patient.state": "PID^1^11^1^4",
    "referring.name": "ORC^1^12",
    "referring.npi": "ORC^1^12^1",
    "referring.organization": "ORC^1^21",
    "exam.exam_type": "OBR^1^4",
    "exam.performed_on": "OBR^1^7",
    "exam.facility": "ORC^1^21",
    "clinical_question": "OBR^1^31",
    "reason": "OBR^1^31",
    "partner_case_ref": "ORC^1^2^1",
    "partner_case_ref_system": "ORC^1^2^3",
    "gestational_age_weeks": "OBX^1^5",
    "coverage.plan_code": "IN1^1^2",
    "coverage.member_id": "IN1^1^36",
}


@dataclass(frozen=True)
class ErrorItem:
    """One ERR segment: where (ERR-2), which table 0357 condition (ERR-3), and what to fix (ERR-8)."""

    location: str
    code: str
    text: str


class OrderInvalid(Exception):
    """The order cannot be taken; `reject` (AR) when the message is not one this listener takes at all, else AE."""

    def __init__(self, errors: list[ErrorItem], reject: bool = False) -> None:
        super().__init__("; ".join(f"{e.location}: {e.text}" for e in errors))
        self.errors = errors
        self.reject = reject


@dataclass(frozen=True)
class SenderRules:
    """What a sender's registration adds to the mapping."""

    default_reason: Reason | None = None
    exam_codes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Header:
    """What the ACK needs of the message's MSH, read even from a message that is otherwise refused."""

    sending_application: str  # MSH-3.1
    sending_facility: str  # MSH-4.1
    control_id: str  # MSH-10
    message_type: str  # MSH-9.1
    trigger: str  # MSH-9.2
    version: str  # MSH-12


@dataclass(frozen=True)
class Order:
    """What the message asks: `control` NW with the case to open, or CA with the order to cancel."""

    control: str
    placer: str
    placer_system: str | None
    case: CaseCreate | None


class Hl7Text:
    """A parsed message, its values read as text: `value("PID", 7)`, `value("PID", 5, component=2)`."""

    def __init__(self, text: str) -> None:
        self.message = hl7.parse(text)
        msh = self.message.segment("MSH")
        separators = str(msh[2])
        self.field = str(msh[1])
        self.component = separators[0:1] or "^"
        self.repetition = separators[1:2] or "~"
        self.escape = separators[2:3] or "\\"
        self.subcomponent = separators[3:4] or "&"

    def segments(self, name: str) -> list[Any]:
        try:
            return list(self.message.segments(name))
        except KeyError:
            return []

    def raw(self, seg: Any, number: int) -> str:
        """The field as sent (escaped), "" when absent; MSH numbers its fields as HL7 does (MSH-1 the separator)."""
        try:
            return str(seg[number]) if len(seg) > number else ""
        except (IndexError, KeyError):
            return ""

    def repetitions(self, seg: Any, number: int) -> list[list[list[str]]]:
        """The field's repetitions, each a list of components, each a list of unescaped subcomponents."""
        return [
            [[self.unescape(s) for s in c.split(self.subcomponent)] for c in r.split(self.component)]
            for r in self.raw(seg, number).split(self.repetition)
        ]

    def value(
        self, name: str, number: int, component: int = 1, subcomponent: int = 1, seg: Any = None
    ) -> str:
        """One value of the first repetition, unescaped and stripped; "" when absent (or the segment is)."""
        if seg is None:
            found = self.segments(name)
            if not found:
                return ""
            seg = found[0]
        return part(self.repetitions(seg, number)[0], component, subcomponent)

    def unescape(self, value: str) -> str:
        """HL7 escapes back to text: delimiters, `\\Xhh..\\` as UTF-8 bytes, `\\.br\\` a line break; formatting
        (`\\H\\`, `\\N\\`, other `\\.xx\\`) and locally defined escapes (`\\Z..\\`) are dropped."""
        esc = self.escape
        if esc not in value:
            return value
        out: list[str] = []
        i = 0
        while i < len(value):
            char = value[i]
            end = value.find(esc, i + 1) if char == esc else -1
            if end == -1:
                out.append(char)
                i += 1
                continue
            sequence = value[i + 1 : end]
            i = end + 1
            replaced = {
                "F": self.field,
                "S": self.component,
                "T": self.subcomponent,
                "R": self.repetition,
                "E": esc,
                ".br": "\n",
            }.get(sequence)
            if replaced is not None:
                out.append(replaced)
            elif sequence[:1] == "X" and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", sequence[1:]):
                out.append(bytes.fromhex(sequence[1:]).decode("utf-8", errors="replace"))
        return "".join(out)


def part(components: list[list[str]], component: int, subcomponent: int = 1) -> str:
    if len(components) < component or len(components[component - 1]) < subcomponent:
        return ""
    return components[component - 1][subcomponent - 1].strip()


def decode(block: bytes) -> str:
    """The message's text: UTF-8 (MSH-18 `UNICODE UTF-8`, or none), ISO 8859-1 when MSH-18 says `8859/1`."""
    charset = _raw_msh_field(block, 18)
    if charset.upper() in ("8859/1", "ISO IR100"):
        return block.decode("latin-1")
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        raise OrderInvalid(
            [
                ErrorItem(
                    "MSH^1^18", DATA_TYPE_ERROR, "the message is not UTF-8; send UTF-8 (MSH-18 UNICODE UTF-8)"
                )
            ]
        ) from None


def _raw_msh_field(block: bytes, number: int) -> str:
    first = block.split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return ""
    fields = first[3:].split(first[3:4])  # fields[1] is MSH-2
    return fields[number - 1].decode("latin-1").strip() if len(fields) >= number else ""


def read_header(block: bytes) -> Header:
    """The MSH of a block, read leniently (for the ACK); OrderInvalid (reject) when it is no HL7 message."""
    text = block.decode("utf-8", errors="replace").lstrip("\n")
    if not text.startswith("MSH") or len(text) < 8:
        raise OrderInvalid(
            [
                ErrorItem(
                    "MSH^1",
                    REQUIRED_MISSING,
                    "the block is not an HL7 v2 message (it does not begin with MSH)",
                )
            ],
            reject=True,
        )
    try:
        parsed = Hl7Text(text.replace("\n", "\r"))
        header = Header(
            sending_application=parsed.value("MSH", 3),
            sending_facility=parsed.value("MSH", 4),
            control_id=parsed.value("MSH", 10)[:199],
            message_type=parsed.value("MSH", 9).upper(),
            trigger=parsed.value("MSH", 9, component=2).upper(),
            version=parsed.value("MSH", 12),
        )
    except UNPARSEABLE as exc:
        raise OrderInvalid(
            [
                ErrorItem(
                    "MSH^1", DATA_TYPE_ERROR, "the message's MSH cannot be parsed; check MSH-1 and MSH-2"
                )
            ],
            reject=True,
        ) from exc
    return header


def fingerprint(block: bytes) -> str:
    """SHA-256 of the message without MSH-7 (an engine may stamp a resend anew)."""
    lines = block.replace(b"\n", b"\r").split(b"\r")
    if lines and lines[0].startswith(b"MSH") and len(lines[0]) > 3:
        fields = lines[0].split(lines[0][3:4])
        if len(fields) > 6:
            fields[6] = b""
        lines[0] = lines[0][3:4].join(fields)
    return hashlib.sha256(b"\r".join(line for line in lines if line)).hexdigest()


def read_order(block: bytes, rules: SenderRules) -> Order:
    """The order the message carries; OrderInvalid naming every field to fix (AR for one that cannot be parsed)."""
    try:
        return _read_order(block, rules)
    except (
        UNPARSEABLE
    ) as exc:  # python-hl7 asserts on odd encoding characters, raises these on broken segments
        raise OrderInvalid(
            [
                ErrorItem(
                    "MSH^1", APPLICATION_ERROR, "the message cannot be parsed as HL7 v2; check its delimiters"
                )
            ],
            reject=True,
        ) from exc


def _read_order(block: bytes, rules: SenderRules) -> Order:
    text = decode(block).replace("\r\n", "\r").replace("\n", "\r")
    message = Hl7Text(text)
    header = read_header(block)
    if (header.message_type, header.trigger) not in MESSAGE_TYPES:
        raise OrderInvalid(
            [
                ErrorItem(
                    "MSH^1^9", UNSUPPORTED_MESSAGE_TYPE, "this listener takes orders: ORM^O01 or OMG^O19"
                )
            ],
            reject=True,
        )
    if header.version not in VERSIONS:
        raise OrderInvalid(
            [ErrorItem("MSH^1^12", UNSUPPORTED_VERSION, "send HL7 v2.3, 2.3.1, 2.4, 2.5 or 2.5.1")],
            reject=True,
        )
    orcs = message.segments("ORC")
    if not orcs:
        raise OrderInvalid(
            [ErrorItem("ORC^1", REQUIRED_MISSING, "the message has no ORC; send the order's ORC")]
        )
    if len(orcs) > 1:
        raise OrderInvalid(
            [ErrorItem("ORC^2", APPLICATION_ERROR, "send one order (one ORC with its OBR) per message")]
        )
    control = message.value("ORC", 1).upper()
    if control not in ("NW", "CA"):
        raise OrderInvalid(
            [ErrorItem("ORC^1^1", TABLE_VALUE_NOT_FOUND,
                       "this listener takes order control NW (new order) and CA (cancel); other changes go "
                       "through the case API")],
            reject=True,
        )  # fmt: skip
    placer, system, errors = placer_order(message)
    if errors:
        raise OrderInvalid(errors)
    if control == "CA":
        return Order(control="CA", placer=placer, placer_system=system, case=None)
    return Order(
        control="NW", placer=placer, placer_system=system, case=case_of(message, placer, system, rules)
    )


def placer_order(message: Hl7Text) -> tuple[str, str | None, list[ErrorItem]]:
    """ORC-2 or OBR-2 (EI): the number, and its system when EI.3 is an ISO OID or a URI."""
    orc = message.repetitions(message.segments("ORC")[0], 2)[0]
    obrs = message.segments("OBR")
    obr = message.repetitions(obrs[0], 2)[0] if obrs else [[""]]
    number_orc, number_obr = part(orc, 1), part(obr, 1)
    if number_orc and number_obr and number_orc != number_obr:
        return (
            "",
            None,
            [ErrorItem("OBR^1^2", APPLICATION_ERROR, "ORC-2 and OBR-2 name different placer orders")],
        )
    chosen = orc if number_orc else obr
    number = number_orc or number_obr
    if not number:
        return "", None, [ErrorItem("ORC^1^2", REQUIRED_MISSING,
                                    "the placer order number (ORC-2 or OBR-2) is required: it names the order "
                                    "and its case, and comes back in the result's OBR-2")]  # fmt: skip
    if len(number) > 100:
        return (
            "",
            None,
            [ErrorItem("ORC^1^2^1", DATA_TYPE_ERROR, "the placer order number is at most 100 characters")],
        )
    universal, kind = part(chosen, 3), part(chosen, 4).upper()
    system = None
    if universal and kind == "ISO" and re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", universal):
        system = f"urn:oid:{universal}"
    elif universal and kind == "URI" and is_identifier_system(universal):
        system = universal
    elif universal:
        return "", None, [ErrorItem("ORC^1^2^3", DATA_TYPE_ERROR,
                                    "the placer order's universal id (EI.3) must be an ISO OID with EI.4 ISO, or "
                                    "an absolute URI with EI.4 URI; or leave EI.3 and EI.4 empty")]  # fmt: skip
    return number, system, []


def case_of(message: Hl7Text, placer: str, system: str | None, rules: SenderRules) -> CaseCreate:
    errors: list[ErrorItem] = []
    pid = message.segments("PID")
    if not pid:
        raise OrderInvalid(
            [ErrorItem("PID^1", REQUIRED_MISSING, "the order has no PID; send the patient's PID")]
        )
    patient = patient_of(message, pid[0], errors)
    referring = referring_of(message, errors)
    organization = message.value("ORC", 21) or message.value("MSH", 4)
    referring["organization"] = organization
    obrs = message.segments("OBR")
    if not obrs:
        raise OrderInvalid(
            [ErrorItem("OBR^1", REQUIRED_MISSING, "the order has no OBR; send the OBR of the order")]
        )
    obr = obrs[0]
    exam_type = exam_type_of(message, obr, rules, errors)
    performed_on = day_of(
        message.value("OBR", 7, seg=obr), "OBR^1^7", "the date of the original ultrasound", errors
    )
    question, reason = clinical_question_of(message, obr, rules, errors)
    body: dict[str, Any] = {
        "partner_case_ref": placer,
        "partner_case_ref_system": system,
        "patient": patient,
        "referring": referring,
        "exam": {"exam_type": exam_type, "performed_on": performed_on, "facility": organization},
        "clinical_question": question,
        "reason": reason,
    }
    weeks = gestational_age_of(message, obr, errors)
    if weeks is not None:
        body["gestational_age_weeks"] = weeks
    in1 = message.segments("IN1")
    if in1:
        plan, member = message.value("IN1", 2, seg=in1[0]), message.value("IN1", 36, seg=in1[0])
        if plan or member:
            body["coverage"] = {"plan_code": plan or None, "member_id": member or None}
    if errors:
        raise OrderInvalid(errors)
    try:
        return CaseCreate.model_validate(body)
    except ValidationError as exc:
        raise OrderInvalid([model_error(e) for e in exc.errors()[:20]]) from exc


def model_error(error: Any) -> ErrorItem:
    """The model's refusal of one value as an ERR: its message, at the HL7 field it came from."""
    name = ".".join(str(p) for p in error["loc"])
    code = REQUIRED_MISSING if error["type"] == "missing" else DATA_TYPE_ERROR
    return ErrorItem(SOURCES.get(name, ""), code, f"{name}: {error['msg']}")


def patient_of(message: Hl7Text, pid: Any, errors: list[ErrorItem]) -> dict[str, Any]:
    identifiers = message.repetitions(pid, 3)
    chosen = next((cx for cx in identifiers if part(cx, 5).upper() == "MR" and part(cx, 1)), identifiers[0])
    mrn = part(chosen, 1)
    if not mrn:
        errors.append(
            ErrorItem("PID^1^3", REQUIRED_MISSING, "the patient's MRN (PID-3, a CX of type MR) is required")
        )
    name = message.repetitions(pid, 5)[0]
    family, given = part(name, 1), part(name, 2)
    if not family:
        errors.append(
            ErrorItem("PID^1^5^1", REQUIRED_MISSING, "the patient's family name (PID-5.1) is required")
        )
    if not given:
        errors.append(
            ErrorItem("PID^1^5^2", REQUIRED_MISSING, "the patient's given name (PID-5.2) is required")
        )
    birth = day_of(part(message.repetitions(pid, 7)[0], 1), "PID^1^7", "the patient's date of birth", errors)
    sex_code = part(message.repetitions(pid, 8)[0], 1).upper()
    sex: Sex | None = SEX.get(sex_code)
    if not sex_code:
        errors.append(
            ErrorItem("PID^1^8", REQUIRED_MISSING, "the patient's sex (PID-8, HL7 table 0001) is required")
        )
    elif sex is None:
        errors.append(
            ErrorItem("PID^1^8", TABLE_VALUE_NOT_FOUND, "PID-8 must be F, M, O, U, A or N (HL7 table 0001)")
        )
    state = part(message.repetitions(pid, 11)[0], 4).upper()
    if not state:
        errors.append(ErrorItem("PID^1^11^1^4", REQUIRED_MISSING,
                                "the patient's US state of residence (PID-11.4, e.g. CA) is required: the "
                                "reviewing specialist must be licensed there"))  # fmt: skip
    return {
        "family_name": family,
        "given_name": given,
        "birth_date": birth,
        "sex": sex,
        "mrn": mrn,
        "state": state,
    }


def referring_of(message: Hl7Text, errors: list[ErrorItem]) -> dict[str, Any]:
    """ORC-12, else OBR-16: the XCN whose assigning authority (XCN.9) or identifier type (XCN.13) is NPI."""
    for name, number, location in (("ORC", 12, "ORC^1^12"), ("OBR", 16, "OBR^1^16")):
        segments = message.segments(name)
        if not segments:
            continue
        for xcn in message.repetitions(segments[0], number):
            authority = (part(xcn, 9, 1).upper(), part(xcn, 9, 2))
            if not (authority[0] == "NPI" or authority[1] == NPI_OID or part(xcn, 13).upper() == "NPI"):
                continue
            npi = part(xcn, 1)
            if not re.fullmatch(r"\d{10}", npi):
                errors.append(ErrorItem(f"{location}^1", DATA_TYPE_ERROR,
                                        "the ordering provider's NPI (XCN.1) must be 10 digits"))  # fmt: skip
            names = [part(xcn, 6), part(xcn, 3), part(xcn, 4), part(xcn, 2)]  # prefix, given, middle, family
            full = " ".join(n for n in names if n)
            if not part(xcn, 2):
                errors.append(ErrorItem(f"{location}^2", REQUIRED_MISSING,
                                        "the ordering provider's family name (XCN.2) is required"))  # fmt: skip
            return {"name": full, "npi": npi}
    errors.append(ErrorItem("ORC^1^12", REQUIRED_MISSING,
                            "the ordering provider (ORC-12 or OBR-16) with an NPI is required: XCN.1 the NPI, "
                            "XCN.9 NPI (or XCN.13 NPI)"))  # fmt: skip
    return {"name": "", "npi": ""}


def exam_type_of(message: Hl7Text, obr: Any, rules: SenderRules, errors: list[ErrorItem]) -> str:
    service = message.repetitions(obr, 4)[0]
    for code in (part(service, 1), part(service, 4)):
        if code and code in rules.exam_codes:
            return rules.exam_codes[code]
    for text in (part(service, 2), part(service, 5)):
        for word in re.findall(r"[a-z]+", text.lower()):
            exam_type = EXAM_WORDS.get(word, word)
            if exam_type in EXAM_TYPES:
                return exam_type
    if not any(part(service, n) for n in (1, 2, 4, 5)):
        errors.append(ErrorItem("OBR^1^4", REQUIRED_MISSING, "the universal service (OBR-4) is required"))
    else:
        errors.append(ErrorItem("OBR^1^4", TABLE_VALUE_NOT_FOUND,
                                "OBR-4 names no exam type this programme reads: its text must name one of "
                                f"{', '.join(EXAM_TYPES)}, or its code be in your sender's exam_codes"))  # fmt: skip
    return ""


def clinical_question_of(
    message: Hl7Text, obr: Any, rules: SenderRules, errors: list[ErrorItem]
) -> tuple[str, str | None]:
    """OBR-31 (texts, and codes that are `reason` values) and the NTEs after the OBR: the question and reason."""
    reasons = message.repetitions(obr, 31)
    reason = next((part(r, 1) for r in reasons if part(r, 1) in REASONS), None)
    texts = [part(r, 2) or (part(r, 1) if part(r, 1) not in REASONS else "") for r in reasons]
    segments = list(message.message)
    after = segments[segments.index(obr) + 1 :] if obr in segments else []
    for seg in after:
        if str(seg[0]) != "NTE":
            break
        texts.extend(" ".join(part(r, 1) for r in message.repetitions(seg, 3)).split("\n"))
    question = " ".join(t.strip() for t in texts if t.strip())[:2000]
    if not question:
        errors.append(ErrorItem("OBR^1^31", REQUIRED_MISSING,
                                "the clinical question is required: OBR-31 (reason for study) or an NTE after "
                                "the OBR"))  # fmt: skip
    if reason is None and rules.default_reason is not None:
        reason = rules.default_reason.value
    if reason is None:
        errors.append(ErrorItem("OBR^1^31", REQUIRED_MISSING,
                                f"the reason for a second opinion is required: an OBR-31 code of {', '.join(Reason)}, "
                                "or a default_reason on your sender's registration"))  # fmt: skip
    return question, reason


def gestational_age_of(message: Hl7Text, obr: Any, errors: list[ErrorItem]) -> int | None:
    """An OBX of the order (after its OBR) coded LOINC 49051-6, its value (NM) the gestational age in weeks."""
    segments = list(message.message)
    for seg in segments[segments.index(obr) + 1 :] if obr in segments else []:
        if str(seg[0]) == "ORC":
            break
        if str(seg[0]) != "OBX" or message.value("OBX", 3, seg=seg) != GESTATIONAL_AGE_LOINC:
            continue
        value = message.value("OBX", 5, seg=seg)
        try:
            return int(float(value))
        except ValueError:
            errors.append(ErrorItem("OBX^1^5", DATA_TYPE_ERROR,
                                    "the gestational age (OBX-5 of LOINC 49051-6) must be a number of weeks"))  # fmt: skip
            return None
    return None


def day_of(value: str, location: str, what: str, errors: list[ErrorItem]) -> str | None:
    """A DT / TS / DTM's date as ISO 8601; None with an ERR when absent or not a date."""
    if not value:
        errors.append(
            ErrorItem(location, REQUIRED_MISSING, f"{what} ({location.replace('^1^', '-')}) is required")
        )
        return None
    try:
        if not re.fullmatch(r"\d{8}", value[:8]):
            raise ValueError
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])).isoformat()
    except ValueError:
        errors.append(ErrorItem(location, DATA_TYPE_ERROR, f"{what} must be a date, YYYYMMDD"))
        return None


def ack(header: Header, code: str, control_id: str, text: str, errors: Sequence[ErrorItem] = ()) -> str:
    """The ACK (original mode): MSH, MSA (code, their MSH-10, `text`), an ERR per error; segments end in CR."""
    trigger = header.trigger if (header.message_type, header.trigger) in MESSAGE_TYPES else ""
    segments = [
        segment(
            "MSH",
            ENCODING_CHARACTERS,
            SENDING_APPLICATION,
            SENDING_FACILITY,
            escape(header.sending_application),
            escape(header.sending_facility),
            timestamp(datetime.now(UTC)),
            "",
            f"ACK^{trigger}^ACK" if trigger else "ACK",
            control_id,
            "P",
            header.version if header.version in VERSIONS else "2.5.1",
            "",
            "",
            "",
            "",
            "",
            CHARACTER_SET,
        ),
        segment("MSA", code, escape(header.control_id), escape(text)),
    ]
    for error in errors:
        condition = f"{error.code}^{escape(CODE_TEXT.get(error.code, ''))}^HL70357"
        segments.append(segment("ERR", "", error.location, condition, "E", "", "", "", escape(error.text)))
    return "\r".join(segments) + "\r"
