from pathlib import Path

from services.records.assembly import (
    MISSING_REPORT,
    MISSING_ULTRASOUND,
    missing_items,
    report_text,
    summarize_study,
)
from services.records.classify import PDF_TYPE, TEXT_TYPE
from services.records.models import FileKind, RecordFile
from tests.dicom_factory import make_pdf_report


def instance(study: str, series: str, sop: str, *, frames: int = 1, modality: str = "US") -> RecordFile:
    return RecordFile(
        case_id="c1",
        kind=FileKind.DICOM,
        sha256=sop.ljust(64, "0"),
        content_type="application/dicom",
        size_bytes=1,
        storage_path="x",
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        modality=modality,
        number_of_frames=frames,
    )


REPORT = RecordFile(
    case_id="c1",
    kind=FileKind.REPORT,
    sha256="f" * 64,
    content_type=TEXT_TYPE,
    size_bytes=1,
    storage_path="x",
)


def test_the_study_with_most_ultrasound_instances_is_summarized() -> None:
    files = [
        instance("1.1", "1.1.1", "9.1"),
        instance("1.2", "1.2.1", "9.2"),
        instance("1.2", "1.2.1", "9.3", frames=40),
        instance("1.2", "1.2.2", "9.4", frames=2),
        instance("1.2", "1.2.2", "9.4", frames=2),  # the same instance uploaded again as other bytes
        instance("1.3", "1.3.1", "9.5", modality="CT"),
        instance("1.3", "1.3.1", "9.6", modality="CT"),
        instance("1.3", "1.3.1", "9.7", modality="CT"),
    ]
    summary = summarize_study(files)
    assert summary is not None
    assert summary.model_dump() == {
        "study_instance_uid": "1.2",
        "modality": "US",
        "instance_count": 3,
        "multiframe_count": 2,
        "series_count": 2,
    }


def test_a_tie_goes_to_the_study_uploaded_first() -> None:
    summary = summarize_study([instance("1.5", "s", "9.1"), instance("1.4", "s", "9.2")])
    assert summary is not None and summary.study_instance_uid == "1.5"


def test_no_ultrasound_no_summary() -> None:
    assert summarize_study([instance("1.3", "1.3.1", "9.5", modality="CT"), REPORT]) is None


def test_missing_items_name_what_the_uploader_still_owes() -> None:
    assert missing_items([]) == [MISSING_REPORT, MISSING_ULTRASOUND]
    assert missing_items([REPORT, instance("1", "1", "1", modality="CT")]) == [MISSING_ULTRASOUND]
    assert missing_items([instance("1", "1", "1")]) == [MISSING_REPORT]
    assert missing_items([REPORT, instance("1", "1", "1")]) == []


def test_report_text_from_pdf_and_from_text(tmp_path: Path) -> None:
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(make_pdf_report("FINDINGS: 4 cm complex cyst.\nIMPRESSION: O-RADS 4."))
    text = tmp_path / "r.txt"
    text.write_bytes("\ufeffIMPRESSION: O-RADS 4.".encode())
    assert report_text(pdf, PDF_TYPE) == "FINDINGS: 4 cm complex cyst.\nIMPRESSION: O-RADS 4."
    assert report_text(text, TEXT_TYPE) == "IMPRESSION: O-RADS 4."
