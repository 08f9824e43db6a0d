"""The ORU^R01 as an interface engine parses it (python-hl7): delimiters in any text escaped and read back equal."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime

import hl7

from contracts.models import Patient, Sex
from services.intake.hl7_oru import Interpreter, OruReport, escape, oru_r01, read_ack

DELIMITERS = "a|b^c&d~e\\f"


def report(**changes: object) -> OruReport:
    fields: dict[str, object] = {
        "control_id": "SO0123456789ABCDEF01",
        "created_at": datetime(2026, 12, 7, 19, 0, tzinfo=UTC),
        "receiving_application": "RIS",
        "receiving_facility": "BAYVIEW",
        "assigning_authority": "BAYVIEW_MRN",
        "patient": Patient(
            family_name=f"O'Brien|Smith^{DELIMITERS}",
            given_name="Zoë ~ Ann & co",
            birth_date=date(1984, 3, 2),
            sex=Sex.FEMALE,
            mrn=f"MRN-{DELIMITERS}",
            state="CA",
        ),
        "placer_order": f"REF|{DELIMITERS}",
        "case_id": "3f6c1f8e-case",
        "exam_type": "pelvic",
        "performed_on": date(2026, 11, 20),
        "issued": datetime(2026, 12, 7, 18, 30, tzinfo=UTC),
        "result_status": "F",
        "interpreter": Interpreter(name=f"Dr. Ada Lovelace {DELIMITERS}", npi="1234567893"),
        "conclusion": f"Impression: {DELIMITERS}\nRecommendations:\n- repeat in 8|12 weeks",
        "pdf": b"%PDF-1.7 not really",
    }
    return OruReport(**(fields | changes))  # type: ignore[arg-type]


def parsed(message: bytes) -> hl7.Message:
    return hl7.parse(message.decode("utf-8"))


def test_text_with_every_delimiter_is_parsed_back_equal() -> None:
    """Unescaped, `|` would end the field, `^` split the name, `~` repeat it, `&` and `\\` corrupt it."""
    message = parsed(oru_r01(report()))
    pid, obr = message.segment("PID"), message.segment("OBR")
    assert message.unescape(str(pid[5][0][0])) == f"O'Brien|Smith^{DELIMITERS}"
    assert message.unescape(str(pid[5][0][1])) == "Zoë ~ Ann & co"
    assert message.unescape(str(pid[3][0][0])) == f"MRN-{DELIMITERS}"
    assert str(pid[3][0][3]) == "BAYVIEW_MRN" and str(pid[3][0][4]) == "MR"
    assert message.unescape(str(obr[2][0][0])) == f"REF|{DELIMITERS}"
    obx = message.segments("OBX")
    assert str(obx[0][2]) == "FT"
    conclusion = message.unescape(str(obx[0][5]))
    assert conclusion == f"Impression: {DELIMITERS}\rRecommendations:\r- repeat in 8|12 weeks"
    assert str(obr[32]).split("&")[0] == "1234567893"


def test_escape_writes_the_five_escape_sequences() -> None:
    assert escape("|^&~\\") == "\\F\\\\S\\\\T\\\\R\\\\E\\"
    assert escape("a\r\nb\x0b\x1c") == "a b  "  # no line break or MLLP framing byte inside a field


def test_the_message_header_and_result_status_are_what_an_engine_routes_on() -> None:
    message = parsed(oru_r01(report(result_status="C", conclusion=None)))
    msh = message.segment("MSH")
    assert (
        str(msh[9]) == "ORU^R01^ORU_R01"
        and str(msh[12]) == "2.5.1"
        and str(msh[10]) == "SO0123456789ABCDEF01"
    )
    assert (str(msh[5]), str(msh[6]), str(msh[18])) == ("RIS", "BAYVIEW", "UNICODE UTF-8")
    assert str(message.segment("OBR")[25]) == "C"
    [obx] = message.segments("OBX")  # no conclusion: the PDF only
    assert str(obx[2]) == "ED" and str(obx[11]) == "C"
    assert base64.b64decode(str(obx[5][0][4])) == b"%PDF-1.7 not really"


def test_an_ack_is_read_for_its_code_and_the_control_id_it_acknowledges() -> None:
    ack = read_ack(
        b"MSH|^~\\&|RIS|BAYVIEW|SECONDOPINION|SECONDOPINION|20261207||ACK|A1|P|2.5.1\rMSA|ae|SO1\r"
    )
    assert ack is not None and (ack.code, ack.control_id) == ("AE", "SO1")
    assert read_ack(b"not hl7 at all") is None
    assert read_ack(b"MSH|^~\\&|RIS|BAYVIEW|||20261207||ACK|A1|P|2.5.1\r") is None
