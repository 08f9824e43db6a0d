"""What the specialist and the referring side write reaches every form of the report as written (PDF, FHIR
DiagnosticReport, DICOM Encapsulated PDF), or the specialist is told up front what the report cannot print."""

from __future__ import annotations

import base64
import io
import re
import time
from datetime import date

import pydicom
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.valuerep import validate_value
from pypdf import PdfReader
from sqlalchemy.engine import Engine

from services.common.config import Settings
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import FINDINGS, apply, assigned_review, compose_command, outbox_event
from tests.integration.test_review_followup import question_command
from tests.keys import specialist_headers
from tests.unit.test_review_matching import request
from tests.unit.test_review_report_scripts import drawn_lines

engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables

ORIGINAL = "右卵巣に6cmの複雑性嚢胞性腫瘤。充実部に血流あり。印象: O-RADS 5。"
QUESTION = "Łódź clinic asks: can the repeat scan be done at 8 weeks? 재검사 가능합니까?"
WRITTEN = FINDINGS | {
    "findings": "β-hCG ≥ 5 mIU/mL; 4×3 cm cyst, <b>no</b> flow & no <para>solid</para> part. Čeština, Ελληνικά.",
    "impression": "Haemorrhagic cyst (出血性嚢胞), O-RADS 2 — not O\u2011RADS 5.",
    "alternative_diagnoses": ["Endometrioma (子宮内膜症性嚢胞)", "Кистома"],
}


def test_text_beyond_latin_1_reaches_the_pdf_fhir_and_dicom_as_written(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """Helvetica draws Latin-1 only: a Polish patient name, an original report in Japanese, "β-hCG ≥ 5" were
    printed as black boxes, the report unreadable where it mattered, though FHIR and DICOM had the text."""
    base = request("pelvic", "CA")
    patient = base.patient.model_copy(update={"family_name": "Wróbel-O'Łukasz", "given_name": "Zoë 山田"})
    command, assigned = assigned_review(
        engine,
        settings,
        patient=patient,
        clinical_question="Ist die Läsion maligne? 悪性ですか?",
        original_report=base.original_report.model_copy(update={"text": ORIGINAL}),
    )
    case_id, review_id = command.subject, assigned["review_id"]
    signed = specialist_headers(settings)
    submitted = client.post(f"/v1/reviews/{review_id}", json=WRITTEN, headers=signed)
    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))
    apply(engine, settings, question_command(case_id, "q1", QUESTION))
    answer = "Yes: 8 weeks (8주) is fine."
    answered = client.post(
        f"/v1/reviews/{review_id}/questions/q1/answer", json={"answer": answer}, headers=signed
    )
    assert answered.status_code == 200, answered.text

    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    text = flow.pdf_text(pdf)
    assert "■" not in text
    unspaced = "".join(text.split())  # a line may break inside CJK text, where extraction adds a space
    for written in (
        "Wróbel-O'Łukasz",
        "Zoë 山田",
        "悪性ですか?",
        ORIGINAL,
        WRITTEN["findings"],
        WRITTEN["impression"],
        *WRITTEN["alternative_diagnoses"],
        QUESTION,
        answer,
    ):
        assert "".join(written.split()) in unspaced, written
    fhir = client.get(f"/v1/reports/{case_id}").json()
    DiagnosticReport.model_validate(fhir)
    assert WRITTEN["impression"] in fhir["conclusion"]
    assert fhir["subject"]["display"] == "Zoë 山田 Wróbel-O'Łukasz"
    issued = outbox_event(engine, f"document.encapsulated_report:{case_id}:2")
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(issued.data["dicom_base64"])))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.PatientName.family_name, ds.PatientName.given_name) == ("Wróbel-O'Łukasz", "Zoë 山田")
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == pdf


def test_characters_the_report_cannot_print_are_refused_at_submission_naming_the_field(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """An emoji or a control character was taken and printed as a black box: the signed report no longer said
    what the specialist wrote, and nobody was told."""
    _, assigned = assigned_review(engine, settings)
    body = WRITTEN | {
        "findings": "Unassigned \u0378",
        "impression": "Benign 🙂",
        "alternative_diagnoses": ["Endometrioma", "Dermoid\x07"],
        "recommendations": [
            {"text": "Repeat ✅", "follow_up": {"action": "ultrasound", "when": {"unit": "now"}}}
        ],
    }

    response = client.post(
        f"/v1/reviews/{assigned['review_id']}", json=body, headers=specialist_headers(settings)
    )

    assert response.status_code == 422
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert set(errors) == {"findings", "impression", "alternative_diagnoses.1", "recommendations.0"}
    assert errors["impression"] == (
        "has U+1F642 SLIGHTLY SMILING FACE, which the report cannot print; "
        "write it in words (or leave it out) and send again"
    )
    assert errors["alternative_diagnoses.1"].startswith("has U+0007 a control character, which")
    assert errors["findings"].startswith("has U+0378 a private-use or unassigned character, which")
    assert client.get(f"/v1/reviews/{assigned['review_id']}").json()["status"] == "accepted"


NAMES = {"given_name": "क्षत्रिय 𠮷", "family_name": "สมชาย"}
SCRIPTS = FINDINGS | {
    "findings": "दाएँ अंडाशय में 6 सेमी की पुटी। ก้อนซีสต์ที่รังไข่ขวา. یہ سادہ سسٹ ہے۔",
    "impression": "出血性囊肿 — 出血性嚢胞 — 출혈성 낭종; 𠮷野 😀",
}


def test_devanagari_thai_urdu_cjk_and_beyond_the_bmp_are_taken_and_printed(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """A Hindi, Thai or Urdu specialist was refused at submission (422 naming U+0915 ...), an emoji DejaVu Sans
    draws too (its line was lost to text extraction), and the referring side's names and text in these
    scripts were printed as [U+0915]: now they are printed, extracted as written, and in DICOM as UTF-8."""
    base = request("pelvic", "CA")
    patient = base.patient.model_copy(update=NAMES)
    question = "क्या यह कैंसर है? นี่คือมะเร็งหรือไม่"
    command, assigned = assigned_review(engine, settings, patient=patient, clinical_question=question)
    case_id, review_id = command.subject, assigned["review_id"]

    submitted = client.post(f"/v1/reviews/{review_id}", json=SCRIPTS, headers=specialist_headers(settings))

    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))
    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    text = flow.pdf_text(pdf)
    for written in ("क्षत्रिय 𠮷 สมชาย", question, "दाएँ अंडाशय में 6 सेमी की पुटी।", "ก้อนซีสต์ที่รังไข่ขวา."):
        assert written in text, written
    assert SCRIPTS["impression"] in text
    assert "[U+" not in text
    issued = outbox_event(engine, f"document.encapsulated_report:{case_id}:1")
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(issued.data["dicom_base64"])))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.PatientName.family_name, ds.PatientName.given_name) == ("สมชาย", "क्षत्रिय 𠮷")


def test_an_answer_or_addendum_the_report_cannot_print_is_refused(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, assigned = assigned_review(engine, settings)
    case_id, review_id = command.subject, assigned["review_id"]
    signed = specialist_headers(settings)
    assert client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=signed).status_code == 200
    apply(engine, settings, compose_command(case_id, review_id))
    apply(engine, settings, question_command(case_id, "q1", "Surgery?"))

    answer = client.post(
        f"/v1/reviews/{review_id}/questions/q1/answer", json={"answer": "No 👍"}, headers=signed
    )
    addendum = client.post(f"/v1/reviews/{review_id}/addenda", json={"text": "See 📎"}, headers=signed)

    assert answer.status_code == 422 and "U+1F44D THUMBS UP SIGN" in answer.json()["errors"][0]["message"]
    assert addendum.status_code == 422 and addendum.json()["errors"][0]["field"] == "text"
    assert client.get(f"/v1/reports/{case_id}").json()["meta"]["versionId"] == "1"


def test_a_report_of_the_longest_texts_in_many_short_lines_is_composed_in_seconds(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """Findings and impression at their 20,000 characters, one measurement a line, took minutes to lay out
    (reportlab lays a paragraph, and a table cell, out again at every page it is split over): the consumer
    sat on report.compose, and each answer to a follow-up question held its HTTP request as long."""
    lines = "\n".join(f"{i % 10}" for i in range(10_000))
    assert len(lines) == 19_999
    command, assigned = assigned_review(engine, settings)
    case_id, review_id = command.subject, assigned["review_id"]
    body = FINDINGS | {"findings": lines, "impression": lines + "\n\nEnd of impression."}
    body |= {"alternative_diagnoses": ["d " * 500] * 20, "recommendations": ["r " * 500] * 20}
    submitted = client.post(f"/v1/reviews/{review_id}", json=body, headers=specialist_headers(settings))
    assert submitted.status_code == 422  # the impression is one character too long
    assert [e["field"] for e in submitted.json()["errors"]] == ["impression"]
    body["impression"] = lines
    submitted = client.post(f"/v1/reviews/{review_id}", json=body, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text

    started = time.monotonic()
    apply(engine, settings, compose_command(case_id, review_id))
    composed_in = time.monotonic() - started

    assert composed_in < 15, f"composed in {composed_in:.0f} s"
    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    text = re.sub(r"Case \S+ · version 1 Page \d+ (Original report Second opinion )?", "", flow.pdf_text(pdf))
    unspaced = "".join(text.split())  # without the page's footer and the table's header repeated on each page
    assert unspaced.count(lines.replace("\n", "")) == 2  # findings and impression, every line
    assert unspaced.count("d" * 500) == 20 and unspaced.count("r" * 500) == 20


def test_the_answers_to_the_patient_keep_their_lines_and_paragraphs(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """Technical notes, the answers to the patient and a follow-up question were printed as one run-on
    paragraph: a numbered list lost its line breaks and its blank lines."""
    command, assigned = assigned_review(engine, settings)
    case_id, review_id = command.subject, assigned["review_id"]
    answers = "1. Is it cancer? Very unlikely.\n2. Do I need surgery? No.\n\nCall us with any question."
    notes = "No cine sweep.\nGain too high on the left ovary."
    body = FINDINGS | {"patient_answers": answers, "technical_notes": notes}
    submitted = client.post(f"/v1/reviews/{review_id}", json=body, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))
    question = "Two questions:\n1. Can we repeat it here?\n2. When?"
    apply(engine, settings, question_command(case_id, "q1", question))
    answered = client.post(
        f"/v1/reviews/{review_id}/questions/q1/answer",
        json={"answer": "1. Yes.\n2. In 8 weeks."},
        headers=specialist_headers(settings),
    )
    assert answered.status_code == 200, answered.text

    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    lines = [
        line.strip() for page in PdfReader(io.BytesIO(pdf)).pages for line in page.extract_text().split("\n")
    ]

    written = [*answers.split("\n"), *question.split("\n"), "1. Yes.", "2. In 8 weeks."]
    for line in [*written, "Limited: No cine sweep.", "Gain too high on the left ovary."]:
        assert line in lines or not line, line


def test_a_date_before_the_year_1000_is_written_as_a_valid_dicom_date(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """strftime("%Y") does not pad years before 1000: a birth date typed 0984-03-02 (which intake takes) was
    written as PatientBirthDate "9840302", not a DICOM date (DA is 8 digits), in the report's DICOM instance."""
    base = request("pelvic", "CA")
    patient = base.patient.model_copy(update={"birth_date": date(984, 3, 2)})
    command, assigned = assigned_review(engine, settings, patient=patient)
    case_id, review_id = command.subject, assigned["review_id"]
    submitted = client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))

    issued = outbox_event(engine, f"document.encapsulated_report:{case_id}:1")
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(issued.data["dicom_base64"])))

    assert ds.PatientBirthDate == "09840302"
    validate_value("DA", ds.PatientBirthDate, pydicom.config.RAISE)
    assert "0984-03-02" in flow.pdf_text(
        client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    )


def test_what_the_referring_side_wrote_that_no_font_draws_is_shown_by_its_code_point(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """The referring side is not asked again: an emoji in the original report is printed as [U+1F642], a
    combining accent on its letter, zero-width and bidi controls (invisible anyway) left out; not black boxes."""
    base = request("pelvic", "CA")
    original = "Cyste\u0301 5 cm 🙂, no\u200b flow \u2066(RI 0.6)\u2069."
    command, assigned = assigned_review(
        engine, settings, original_report=base.original_report.model_copy(update={"text": original})
    )
    case_id, review_id = command.subject, assigned["review_id"]
    submitted = client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))

    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content

    assert "Cysté 5 cm [U+1F642], no flow (RI 0.6)." in flow.pdf_text(pdf)


def test_a_clinical_question_that_prints_longer_than_a_page_goes_on_on_the_next(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """Intake takes a clinical question of 2,000 emoji; printed [U+1F642] each, its row of the patient table
    was taller than a page and every composition failed (LayoutError): the case never got its report."""
    command, assigned = assigned_review(engine, settings, clinical_question="🙂" * 2000)
    case_id, review_id = command.subject, assigned["review_id"]
    submitted = client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text

    apply(engine, settings, compose_command(case_id, review_id))

    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    text = re.sub(r"Case \S+ · version 1 Page \d+ ", "", flow.pdf_text(pdf))  # without the page footers
    assert "".join(text.split()).count("[U+1F642]") == 2000


def test_hebrew_and_arabic_findings_are_printed_right_to_left_and_kept_as_written_elsewhere(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """A specialist in Israel or Egypt wrote findings the PDF printed backwards (Arabic unjoined as well); the
    FHIR conclusion and the DICOM copy carry the text as written, in reading order."""
    base = request("pelvic", "CA")
    patient = base.patient.model_copy(update={"family_name": "כהן", "given_name": "שרה"})
    command, assigned = assigned_review(engine, settings, patient=patient)
    case_id, review_id = command.subject, assigned["review_id"]
    hebrew = "ציסטה של 12 mm, ללא זרימה (Doppler)."
    arabic = "كيس بسيط، لا يوجد تدفق"  # simple cyst, no flow
    body = FINDINGS | {"findings": hebrew, "impression": arabic}
    submitted = client.post(f"/v1/reviews/{review_id}", json=body, headers=specialist_headers(settings))
    assert submitted.status_code == 200, submitted.text
    apply(engine, settings, compose_command(case_id, review_id))

    pdf = client.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    lines = drawn_lines(pdf)

    assert "ןהכ הרש" in lines  # the patient, שרה כהן read from the right
    assert ".(Doppler) המירז אלל ,mm 12 לש הטסיצ" in lines
    # Left to right: تدفق يوجد لا ،بسيط كيس, each letter joined to its neighbours
    assert (
        "\ufed6\ufed3\ufeaa\ufe97 \ufeaa\ufe9f\ufeee\ufef3 \ufefb \u060c\ufec2\ufef4\ufeb4\ufe91 \ufeb2\ufef4\ufedb"
        in lines
    )
    fhir = client.get(f"/v1/reports/{case_id}").json()
    assert arabic in fhir["conclusion"] and fhir["subject"]["display"] == "שרה כהן"
    issued = outbox_event(engine, f"document.encapsulated_report:{case_id}:1")
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(issued.data["dicom_base64"])))
    assert (ds.PatientName.family_name, ds.PatientName.given_name) == ("כהן", "שרה")
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == pdf
