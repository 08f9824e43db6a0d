from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
from datetime import UTC, datetime

import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pypdf import PdfReader

from contracts.envelope import CloudEvent
from services.common.errors import PoisonMessage
from services.review.api import negotiate_report_format
from services.review.consumer import parse
from services.review.diagnostic_report import attachment_hash, build_diagnostic_report
from services.review.models import ReviewFindings, Specialist
from services.review.report_pdf import ReportContent, render_report_pdf
from tests.unit.test_review_matching import request

ORIGINAL = (
    "Right adnexal complex cystic mass 6.1 cm with thick septations & solid nodule.\n\nImpression: O-RADS 5."
)


def content(*, agreement: str = "major_discrepancy", original: str = ORIGINAL) -> ReportContent:
    case = request("pelvic", "CA").model_copy(
        update={
            "original_report": request("pelvic", "CA").original_report.model_copy(update={"text": original})
        }
    )
    findings = ReviewFindings(
        technical_quality="limited",
        technical_notes="No cine clips of the nodule.",
        agreement=agreement,  # type: ignore[arg-type]
        findings="Hemorrhagic cyst with retracting clot <2 cm>; no internal vascularity.",
        impression="O-RADS 2: almost certainly benign hemorrhagic cyst.",
        alternative_diagnoses=["Endometrioma"],
        recommendations=["Follow-up pelvic ultrasound in 8-12 weeks."],
        new_ultrasound_needed=True,
    )
    reviewer = Specialist(
        id="spec-gyn-1",
        display_name="Elena Marquez",
        credentials="MD, FACR",
        npi="1234567810",
        subspecialties=["gynecologic_imaging"],
        licensed_states=["CA"],
        organization="Pacific University",
        academic=True,
        max_open_reviews=5,
    )
    return ReportContent(
        case_id="case-1",
        request=case,
        findings=findings,
        reviewer=reviewer,
        subspecialty="gynecologic_imaging",
        signed_at=datetime(2025, 3, 5, 14, 30, tzinfo=UTC),
    )


def pdf_text(pdf: bytes) -> str:
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    return " ".join(text.split())


def test_pdf_puts_original_and_second_opinion_side_by_side_with_signature() -> None:
    text = pdf_text(render_report_pdf(content()))

    for expected in (
        "Second-opinion report — diagnostic ultrasound",
        "Jane Doe",
        "1980-01-01",
        "M1",
        "Dr Ref",
        "Original report",
        "Second opinion",
        "thick septations & solid nodule",
        "Impression: O-RADS 5.",
        "retracting clot <2 cm>",
        "O-RADS 2: almost certainly benign hemorrhagic cyst.",
        "Major discrepancy with the original report",
        "Endometrioma",
        "Follow-up pelvic ultrasound in 8-12 weeks.",
        "A new ultrasound examination is needed.",
        "Limited: No cine clips of the nodule.",
        "Elena Marquez, MD, FACR",
        "gynecologic imaging",
        "Electronically signed 2025-03-05 14:30:00 UTC",
    ):
        assert expected in text, expected


def test_pdf_is_the_same_bytes_for_the_same_content() -> None:
    assert render_report_pdf(content()) == render_report_pdf(content())


@pytest.mark.parametrize(
    "long_report",
    [
        "\n\n".join(f"Paragraph {i}: " + "echogenic focus " * 60 for i in range(40)) + " END-OF-REPORT",
        "hypoechoic " * 4000 + "END-OF-REPORT",
    ],
    ids=["many paragraphs", "one paragraph"],
)
def test_a_report_longer_than_a_page_continues_on_the_next(long_report: str) -> None:
    pdf = render_report_pdf(content(original=long_report))

    assert len(PdfReader(io.BytesIO(pdf)).pages) > 2
    assert "END-OF-REPORT" in pdf_text(pdf)


def test_diagnostic_report_is_valid_r4_and_hashes_the_pdf() -> None:
    pdf = render_report_pdf(content())
    resource = build_diagnostic_report(
        report_id="r-1",
        content=content(),
        pdf=pdf,
        pdf_url="http://review/v1/reports/case-1",
        issued=datetime(2025, 3, 5, 15, 0, tzinfo=UTC),
    )

    report = DiagnosticReport.model_validate(resource)
    form = report.presentedForm[0]
    assert report.status == "final"
    assert (report.meta.versionId, report.meta.lastUpdated.isoformat()) == ("1", "2025-03-05T15:00:00+00:00")
    assert report.category[0].coding[0].code == "RAD"
    assert report.code.coding[0].system == "http://loinc.org"
    assert report.subject.display == "Jane Doe"
    assert (report.subject.type, report.subject.identifier.value) == ("Patient", "M1")
    assert report.subject.identifier.type.coding[0].code == "MR"
    assert report.imagingStudy[0].identifier.value == "urn:oid:1.2.3"
    assert report.conclusion == (
        "O-RADS 2: almost certainly benign hemorrhagic cyst.\n\nRecommendations:\n"
        "- Follow-up pelvic ultrasound in 8-12 weeks.\n- A new ultrasound examination is needed."
    )
    assert "Elena Marquez, MD, FACR" in report.resultsInterpreter[0].display
    interpreter = report.resultsInterpreter[0].identifier
    assert (interpreter.system, interpreter.value) == ("http://hl7.org/fhir/sid/us-npi", "1234567810")
    assert (form.contentType, form.url, form.size) == (
        "application/pdf",
        "http://review/v1/reports/case-1",
        len(pdf),
    )
    assert (
        base64.b64decode(resource["presentedForm"][0]["hash"])
        == hashlib.sha1(pdf, usedforsecurity=False).digest()
    )
    assert attachment_hash(b"abc") == "qZk+NkcGgWq6PiVxeFDCbJzQ2J0="
    # No extension the receiver cannot resolve (the HL7 validator rejects unknown extensions by default).
    assert "extension" not in resource and "contained" not in resource


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "fhir"),
        ("application/pdf", "pdf"),
        ("application/fhir+json", "fhir"),
        ("application/json", "fhir"),
        ("*/*", "fhir"),
        ("application/pdf, */*", "pdf"),
        ("application/json;q=0.5, application/pdf", "pdf"),
        ("application/pdf;q=0, */*", "fhir"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "fhir"),
        ("text/html", None),
        ("application/dicom", "dicom"),
        ("application/dicom;q=0.9, application/pdf;q=0.5", "dicom"),
    ],
)
def test_report_format_is_negotiated(accept: str | None, expected: str | None) -> None:
    assert negotiate_report_format(accept) == expected


def command_event(event_type: str, data: dict, subject: str = "case-1") -> CloudEvent:
    return CloudEvent(
        id="e-1", source="/workflows", type=event_type, subject=subject, time=datetime.now(UTC), data=data
    )


def test_consumer_parses_known_commands() -> None:
    event = command_event("report.compose", {"case_id": "case-1", "review_id": "r-1"})

    # A case from before own addenda sends no flag: it does not deliver them; nor a communication to report.
    assert parse(event).model_dump() == {
        "case_id": "case-1",
        "review_id": "r-1",
        "own_addenda_delivered": False,
        "communication": None,
    }


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (command_event("review.offer", {"case_id": "case-1"}), "does not handle 'review.offer'"),
        (
            command_event("review.match", {"case_id": "case-1", "patient": {"mrn": "SECRET-MRN"}}),
            r"review.match data is invalid \(\d+ error\(s\): .*exam",
        ),
        (command_event("report.compose", {"case_id": "case-2", "review_id": "r"}), "about case case-1"),
    ],
)
def test_consumer_refuses_what_no_retry_can_fix(event: CloudEvent, reason: str) -> None:
    with pytest.raises(PoisonMessage, match=reason) as refused:
        parse(event)
    assert "SECRET-MRN" not in str(refused.value)


def test_the_report_names_the_partners_order_it_answers() -> None:
    ordered = content()
    ordered = dataclasses.replace(
        ordered,
        request=ordered.request.model_copy(update={"partner_id": "bayview", "partner_case_ref": "ORD-1"}),
    )
    pdf = render_report_pdf(ordered)
    issued = datetime(2025, 3, 5, tzinfo=UTC)
    report = DiagnosticReport.model_validate(
        build_diagnostic_report(report_id="r-1", content=ordered, pdf=pdf, pdf_url="http://x", issued=issued)
    )
    [order] = report.basedOn
    assert (order.type, order.identifier.system, order.identifier.value) == (
        "ServiceRequest",
        "urn:secondopinion:partner:bayview",  # sent without a system: as intake's Task names it
        "ORD-1",
    )
    # An order sent with its identifier system (two hospitals behind one partner) is named under it.
    hospital = dataclasses.replace(
        ordered,
        request=ordered.request.model_copy(
            update={"partner_case_ref_system": "urn:oid:2.16.840.1.113883.19.5"}
        ),
    )
    report = DiagnosticReport.model_validate(
        build_diagnostic_report(report_id="r-3", content=hospital, pdf=pdf, pdf_url="http://x", issued=issued)
    )
    [order] = report.basedOn
    assert (order.identifier.system, order.identifier.value) == ("urn:oid:2.16.840.1.113883.19.5", "ORD-1")
    unordered = build_diagnostic_report(
        report_id="r-2", content=content(), pdf=pdf, pdf_url="http://x", issued=issued
    )
    # A case sent without a reference: its order as intake keeps it (ServiceRequest/{case id}) only.
    [order] = unordered["basedOn"]
    assert order["reference"] == f"ServiceRequest/{content().case_id}" and "identifier" not in order


def test_encapsulated_pdf_says_its_times_are_utc() -> None:
    from services.review.encapsulated_pdf import encapsulated_pdf

    issued = datetime(2025, 3, 5, 15, 0, 7, tzinfo=UTC)
    dicom = encapsulated_pdf(
        pdf=b"%PDF-1.4\n", request=request("pelvic", "CA"), report_id="r-1", version=1, issued=issued
    )
    ds = pydicom.dcmread(io.BytesIO(dicom))
    assert (ds.TimezoneOffsetFromUTC, ds.ContentTime) == ("+0000", "150007")
    assert ds.AcquisitionDateTime == "20250305150007+0000"


def test_encapsulated_pdf_writes_only_valid_dicom_values() -> None:
    from pydicom.valuerep import validate_value

    from services.review.encapsulated_pdf import encapsulated_pdf

    case = request("pelvic", "CA")
    case = case.model_copy(
        update={
            "patient": case.patient.model_copy(
                update={"family_name": "Alexandropoulou-Papadimitriou^Konstantinidou", "given_name": "A" * 40}
            ),
            "exam": case.exam.model_copy(update={"accession_number": "RIS-ORDER-2025-000123"}),
        }
    )
    dicom = encapsulated_pdf(
        pdf=b"%PDF-1.4\n", request=case, report_id="r-1", version=1, issued=datetime(2025, 3, 5, tzinfo=UTC)
    )
    ds = pydicom.dcmread(io.BytesIO(dicom))
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        validate_value(ds[keyword].VR, ds[keyword].value, pydicom.config.RAISE)
    assert ds.PatientName.family_name == "Alexandropoulou-Papadimitriou Konstantinidou"


def test_a_family_name_longer_than_the_dicom_limit_keeps_the_given_name() -> None:
    """PN allows 64 characters per component group: a family name of 64 or more was cut with the given name
    behind it, and the report's DICOM copy named the patient by a piece of the family name alone."""
    from pydicom.valuerep import validate_value
    from structlog.testing import capture_logs

    from services.review.encapsulated_pdf import encapsulated_pdf

    family = "Wolfeschlegelsteinhausenbergerdorff-Oppenheimer-Rothschild-Habsburg"  # 67
    case = request("pelvic", "CA")
    for given, kept_family, kept_given in (
        ("Anna", family[:59], "Anna"),  # the given name whole, the family name cut to what is left
        ("Maria Magdalena " * 5, family[:47], "Maria Magdalena"),  # the given name's first 16 characters
        # Cut at 16 characters, the name ended in क्, the conjunct क्ष broken: a syllable is left out whole.
        ("श्री " + "क्षत्रिय " * 2, family[:47], "श्री क्षत्रिय"),
    ):
        patient = case.patient.model_copy(update={"family_name": family, "given_name": given})
        with capture_logs() as logs:
            dicom = encapsulated_pdf(
                pdf=b"%PDF-1.4\n",
                request=case.model_copy(update={"patient": patient}),
                report_id="r-1",
                version=1,
                issued=datetime(2025, 3, 5, tzinfo=UTC),
            )
        ds = pydicom.dcmread(io.BytesIO(dicom))
        validate_value("PN", ds.PatientName, pydicom.config.RAISE)
        assert (ds.PatientName.family_name, ds.PatientName.given_name) == (kept_family, kept_given)
        [warning] = [e for e in logs if e["event"] == "review.dicom_patient_name_shortened"]
        assert warning["log_level"] == "warning" and warning["report_id"] == "r-1"
        assert family not in repr(logs) and given.strip() not in repr(logs) and "Wolfe" not in repr(logs)
