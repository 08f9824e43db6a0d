"""X12 270/271 eligibility (005010X279A1): build the inquiry, validate and read the response.

pyx12 checks the interchange: ISA/IEA, GS/GE and ST/SE control numbers and counts, delimiters and
segment syntax. No pyx12 release ships the 005010X279A1 implementation-guide maps (PyPI's 4.0.0 has
only 004010X092A1 for 270/271), so the guide's rules this service relies on (version, loops, code
values) are checked here, after pyx12.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation

import pyx12.errors
import pyx12.segment
import pyx12.x12file

VERSION = "005010X279A1"
# Diagnostic X-ray (imaging) and professional (physician) visit: what a second-opinion read is billed as.
SERVICE_TYPES = ("4", "98")

SEGMENT_END = "~"
ELEMENT_SEP = "*"
REPETITION_SEP = "^"
COMPONENT_SEP = ":"


DELIMITERS = frozenset(SEGMENT_END + ELEMENT_SEP + REPETITION_SEP + COMPONENT_SEP)


def x12_name(value: str) -> str:
    """A person's or organization's name as an X12 AN value: ASCII, upper case, no delimiters."""
    plain = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    return " ".join("".join(" " if c in DELIMITERS else c for c in plain).upper().split())


class X12Invalid(ValueError):
    """An X12 document that fails envelope, syntax or implementation-guide checks."""


class X12Acknowledged(X12Invalid):
    """Instead of a 271 the payer sent a TA1 or a 999: it refused our 270 (the code says why)."""


@dataclass(frozen=True)
class Party:
    name: str
    id: str


@dataclass(frozen=True)
class Inquiry:
    """What goes into a 270: who asks, whom, about which member, for what."""

    payer: Party
    provider: Party  # the reviewing organization; id is its NPI
    member_id: str
    trace: str  # our reference for this inquiry, echoed in the 271's TRN
    control_number: int
    subscriber_last_name: str = ""
    subscriber_first_name: str = ""
    subscriber_birth_date: str = ""  # YYYYMMDD
    subscriber_gender: str = ""  # F, M or U
    service_types: tuple[str, ...] = SERVICE_TYPES
    sender_id: str = "SECONDOPINION"
    receiver_id: str = ""
    usage: str = "T"  # ISA15: P production, T test (the trading partner agreement decides)


@dataclass(frozen=True)
class Benefit:
    """One EB segment."""

    code: str  # EB01: 1 active, 6 inactive, A coinsurance, B copay, C deductible, ...
    service_types: tuple[str, ...]
    coverage_level: str  # EB02: IND individual, FAM family, ...
    time_period: str  # EB06: 23 calendar year, 29 remaining, 27 visit
    amount: Decimal | None
    percent: Decimal | None
    authorization_required: bool  # EB11 = Y
    in_network: str  # EB12: Y in, N out, W not applicable, "" unsaid
    plan_name: str = ""


@dataclass(frozen=True)
class Rejection:
    """One AAA segment: the loop it was in, the reason code and the follow-up action."""

    loop: str  # "payer" | "provider" | "subscriber"
    reason: str
    follow_up: str


@dataclass(frozen=True)
class EligibilityResponse:
    trace: str
    member_id: str
    payer_id: str
    benefits: tuple[Benefit, ...] = ()
    rejections: tuple[Rejection, ...] = field(default_factory=tuple)
    traces: tuple[str, ...] = ()  # every TRN02 with TRN01 = 2 (ours echoed, maybe a clearinghouse's)
    prior_member_id: str = ""  # 2100C REF*Q4: the id asked, when the payer answers with its current one


def segment(*elements: str) -> str:
    return ELEMENT_SEP.join(elements).rstrip(ELEMENT_SEP) + SEGMENT_END


def _isa(sender: str, receiver: str, control: int, at: datetime, usage: str = "T") -> str:
    return segment(
        "ISA",
        "00",
        " " * 10,
        "00",
        " " * 10,
        "ZZ",
        sender[:15].ljust(15),
        "ZZ",
        receiver[:15].ljust(15),
        at.strftime("%y%m%d"),
        at.strftime("%H%M"),
        REPETITION_SEP,
        "00501",
        f"{control:09d}",
        "0",
        usage,
        COMPONENT_SEP,
    )


def envelope(
    transaction: list[str], *, functional_id: str, sender: str, receiver: str, control: int, usage: str = "T"
) -> str:
    """Wrap ST..SE-less segments in ISA/GS/ST ... SE/GE/IEA with counts and control numbers."""
    at = datetime.now()
    st = segment("ST", "270" if functional_id == "HS" else "271", "0001", VERSION)
    body = [st, *transaction]
    se = segment("SE", str(len(body) + 1), "0001")
    return "".join(
        [
            _isa(sender, receiver, control, at, usage),
            segment(
                "GS",
                functional_id,
                sender,
                receiver,
                at.strftime("%Y%m%d"),
                at.strftime("%H%M"),
                str(control),
                "X",
                VERSION,
            ),
            *body,
            se,
            segment("GE", "1", str(control)),
            segment("IEA", "1", f"{control:09d}"),
        ]
    )


def build_270(inquiry: Inquiry) -> str:
    """A 270 for one subscriber; validated before it is returned."""
    for label, value in (("member id", inquiry.member_id), ("trace", inquiry.trace)):
        if not value.isascii() or DELIMITERS & set(value) or not value.isprintable():
            raise X12Invalid(f"the {label} has characters an X12 element cannot carry")
    today = datetime.now().strftime("%Y%m%d")
    segments = [
        segment("BHT", "0022", "13", inquiry.trace, today, datetime.now().strftime("%H%M")),
        segment("HL", "1", "", "20", "1"),
        segment("NM1", "PR", "2", x12_name(inquiry.payer.name), "", "", "", "", "PI", inquiry.payer.id),
        segment("HL", "2", "1", "21", "1"),
        segment("NM1", "1P", "2", x12_name(inquiry.provider.name), "", "", "", "", "XX", inquiry.provider.id),
        segment("HL", "3", "2", "22", "0"),
        segment("TRN", "1", inquiry.trace, "9SECONDOPN"),
        segment(
            "NM1",
            "IL",
            "1",
            x12_name(inquiry.subscriber_last_name),
            x12_name(inquiry.subscriber_first_name),
            "",
            "",
            "",
            "MI",
            inquiry.member_id,
        ),
        *(
            [segment("DMG", "D8", inquiry.subscriber_birth_date, inquiry.subscriber_gender or "U")]
            if inquiry.subscriber_birth_date
            else []
        ),
        segment("DTP", "291", "D8", today),
        segment("EQ", REPETITION_SEP.join(inquiry.service_types)),
    ]
    document = envelope(
        segments,
        functional_id="HS",
        sender=inquiry.sender_id,
        receiver=inquiry.receiver_id or inquiry.payer.id,
        control=inquiry.control_number,
        usage=inquiry.usage,
    )
    validate(document, "270")
    return document


def read_segments(document: str) -> list[pyx12.segment.Segment]:
    """Segments of an interchange, after pyx12's envelope and syntax checks; raises X12Invalid."""
    try:
        with pyx12.x12file.X12Reader(io.StringIO(document.strip())) as reader:
            segments = list(reader)
            reader.cleanup()  # reports a missing SE, GE or IEA; pyx12 does not call it itself
            problems = [f"{kind} {code}: {text}" for kind, code, text, *_ in reader.pop_errors()]
            problems += [f"{kind} {code}: {text}" for kind, code, text, *_ in reader.err_list]
    except pyx12.errors.X12Error as exc:
        raise X12Invalid(f"not an X12 interchange ({exc})") from exc
    except (ValueError, IndexError, UnicodeError) as exc:
        raise X12Invalid(f"the X12 interchange cannot be read ({type(exc).__name__})") from exc
    if problems:
        raise X12Invalid("; ".join(problems[:5]))
    return segments


def validate(document: str, transaction: str) -> list[pyx12.segment.Segment]:
    """pyx12's checks, then the 005010X279A1 rules for a 270 or 271; returns the segments."""
    segments = read_segments(document)
    ids = [s.get_seg_id() for s in segments]
    by_id = {s.get_seg_id(): s for s in reversed(segments)}
    gs, st = by_id.get("GS"), by_id.get("ST")
    if "TA1" in by_id:
        raise X12Acknowledged(f"TA1 interchange note code {by_id['TA1'].get_value('TA105')}")
    if gs is not None and gs.get_value("GS01") == "FA" and transaction == "271":
        ik5 = by_id.get("IK5")
        raise X12Acknowledged(
            f"999 {ik5.get_value('IK501') if ik5 else ''} {ik5.get_value('IK502') if ik5 else ''}".strip()
        )
    expected_gs = "HS" if transaction == "270" else "HB"
    if gs is None or gs.get_value("GS01") != expected_gs or gs.get_value("GS08") != VERSION:
        raise X12Invalid(f"GS must be functional group {expected_gs} of version {VERSION}")
    if st is None or st.get_value("ST01") != transaction or st.get_value("ST03") != VERSION:
        raise X12Invalid(f"ST must be a {transaction} of implementation guide {VERSION}")
    if ids.count("ST") != 1:
        raise X12Invalid("exactly one transaction set per interchange is expected")
    # A 271 that rejects at the payer (2100A AAA) ends after the first loop; a 270 has all three.
    needed = 3 if transaction == "270" else 1
    hl_levels = [s.get_value("HL03") for s in segments if s.get_seg_id() == "HL"][:3]
    if len(hl_levels) < needed or hl_levels != ["20", "21", "22"][: len(hl_levels)]:
        raise X12Invalid("the HL loops must be information source (20), receiver (21), subscriber (22)")
    entities = [s.get_value("NM101") for s in segments if s.get_seg_id() == "NM1"][:3]
    if len(entities) < needed or entities != ["PR", "1P", "IL"][: len(entities)]:
        raise X12Invalid("NM1 loops 2100A (PR), 2100B (1P) and 2100C (IL) are required in that order")
    if transaction == "270" and "EQ" not in ids:
        raise X12Invalid("a 270 needs at least one EQ (eligibility inquiry) segment in loop 2110C")
    for seg in segments:
        if seg.get_seg_id() == "EB" and not seg.get_value("EB01"):
            raise X12Invalid("EB01 (eligibility or benefit information code) is required")
        if seg.get_seg_id() == "AAA" and not (seg.get_value("AAA01") and seg.get_value("AAA03")):
            raise X12Invalid("AAA01 and AAA03 (reject reason) are required")
    return segments


def _decimal(value: str | None) -> Decimal | None:
    if not value:
        return None
    try:
        return Decimal(value)
    except InvalidOperation as exc:
        raise X12Invalid("a monetary amount or percent in EB07/EB08 is not a number") from exc


_LOOPS = {"20": "payer", "21": "provider", "22": "subscriber", "23": "dependent"}


def parse_271(document: str) -> EligibilityResponse:
    """Read a validated 271 into benefits and rejections; raises X12Invalid."""
    segments = validate(document, "271")
    loop = "payer"
    trace = member_id = payer_id = prior_member_id = ""
    traces: list[str] = []
    repetition = segments[0].get_value("ISA11") or REPETITION_SEP  # the interchange's own separator
    benefits: list[Benefit] = []
    rejections: list[Rejection] = []
    for seg in segments:
        seg_id = seg.get_seg_id()
        if seg_id == "HL":
            loop = _LOOPS.get(seg.get_value("HL03") or "", "other")
        elif seg_id == "TRN" and seg.get_value("TRN01") == "2":
            trace = trace or seg.get_value("TRN02") or ""
            traces.append(seg.get_value("TRN02") or "")
        elif seg_id == "REF" and loop == "subscriber" and seg.get_value("REF01") == "Q4":
            prior_member_id = seg.get_value("REF02") or ""
        elif seg_id == "NM1" and seg.get_value("NM101") == "IL":
            member_id = seg.get_value("NM109") or ""
        elif seg_id == "NM1" and seg.get_value("NM101") == "PR" and not payer_id:
            payer_id = seg.get_value("NM109") or ""
        elif seg_id == "AAA":
            rejections.append(Rejection(loop, seg.get_value("AAA03") or "", seg.get_value("AAA04") or ""))
        elif seg_id == "EB":
            benefits.append(
                Benefit(
                    code=seg.get_value("EB01") or "",
                    service_types=tuple(filter(None, (seg.get_value("EB03") or "").split(repetition))),
                    coverage_level=seg.get_value("EB02") or "",
                    time_period=seg.get_value("EB06") or "",
                    amount=_decimal(seg.get_value("EB07")),
                    percent=_decimal(seg.get_value("EB08")),
                    authorization_required=seg.get_value("EB11") == "Y",
                    in_network=seg.get_value("EB12") or "",
                    plan_name=seg.get_value("EB05") or "",
                )
            )
    return EligibilityResponse(
        trace, member_id, payer_id, tuple(benefits), tuple(rejections), tuple(traces), prior_member_id
    )
