import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from services.common.errors import RecordsRejected
from services.records.classify import DICOM_TYPE, PDF_TYPE, TEXT_TYPE, ClassifiedFile, classify
from services.records.models import FileKind
from services.records.store import ObjectStore
from tests.dicom_factory import make_pdf_report, make_us_instance

STUDY, SERIES = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1"


def classify_bytes(
    tmp_path: Path, data: bytes, *, position: int = 1, total: int = 1, declared: str | None = None
) -> ClassifiedFile:
    store = ObjectStore(tmp_path)
    received = store.receive(io.BytesIO(data), position=position, total=total, limit=10_000_000)
    return classify(received, total=total, declared_type=declared)


def test_an_ultrasound_instance_is_dicom_with_its_uids(tmp_path: Path) -> None:
    data = make_us_instance(None, study_uid=STUDY, series_uid=SERIES, sop_uid="1.2.3.4.5")
    classified = classify_bytes(tmp_path, data)
    assert classified.kind == FileKind.DICOM
    assert classified.content_type == DICOM_TYPE
    assert classified.dicom is not None
    assert (classified.dicom.study_instance_uid, classified.dicom.series_instance_uid) == (STUDY, SERIES)
    assert classified.dicom.sop_instance_uid == "1.2.3.4.5"
    assert (classified.dicom.modality, classified.dicom.number_of_frames) == ("US", 1)


def test_a_cine_clip_reports_its_frames(tmp_path: Path) -> None:
    classified = classify_bytes(
        tmp_path, make_us_instance(None, study_uid=STUDY, series_uid=SERIES, frames=3)
    )
    assert classified.dicom is not None and classified.dicom.number_of_frames == 3


def test_dicom_sent_as_text_plain_is_still_dicom(tmp_path: Path) -> None:
    data = make_us_instance(None, study_uid=STUDY, series_uid=SERIES)
    assert classify_bytes(tmp_path, data, declared="text/plain").kind == FileKind.DICOM


def test_a_pdf_and_a_text_file_are_reports(tmp_path: Path) -> None:
    pdf = classify_bytes(tmp_path, make_pdf_report("IMPRESSION: simple cyst."))
    text = classify_bytes(tmp_path, "IMPRESSION: simple cyst. Größe 3 cm.".encode())
    assert (pdf.kind, pdf.content_type) == (FileKind.REPORT, PDF_TYPE)
    assert (text.kind, text.content_type) == (FileKind.REPORT, TEXT_TYPE)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "is not DICOM (no DICM prefix)"),
        (b"", "is empty"),
        (b"%PDF-1.7\n\xff\xfe garbage", "starts like a PDF but cannot be read"),
        (b"\xff" * 200 + b"DICM", "is not DICOM (no DICM prefix)"),
    ],
)
def test_other_files_are_refused_by_position(tmp_path: Path, data: bytes, problem: str) -> None:
    with pytest.raises(RecordsRejected) as caught:
        classify_bytes(tmp_path, data, position=3, total=5)
    assert str(caught.value).startswith(f"file 3 of 5 {problem}")
    assert str(caught.value).endswith("; nothing from this upload was stored")


def test_text_declared_as_dicom_must_be_dicom(tmp_path: Path) -> None:
    with pytest.raises(RecordsRejected, match=r"file 1 of 1 is not DICOM \(no DICM prefix\)"):
        classify_bytes(tmp_path, b"just some text", declared="application/dicom")


def test_dicom_without_file_meta_is_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.Modality = "US"
    ds.SOPInstanceUID = "1.2.3"
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    with pytest.raises(RecordsRejected, match="is not DICOM"):
        classify_bytes(tmp_path, buffer.getvalue() + b"\xff\xfe")


def test_dicom_without_a_study_uid_is_refused(tmp_path: Path) -> None:
    data = make_us_instance(None, study_uid=STUDY, series_uid=SERIES)
    broken = tmp_path / "broken.dcm"
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.StudyInstanceUID
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(RecordsRejected, match="file 1 of 1 is DICOM without a valid StudyInstanceUID"):
        classify_bytes(tmp_path, broken.read_bytes())


def test_text_that_only_starts_like_json_is_a_text_report(tmp_path: Path) -> None:
    classified = classify_bytes(tmp_path, b"{Addendum} IMPRESSION: simple cyst.")
    assert (classified.kind, classified.content_type) == (FileKind.REPORT, TEXT_TYPE)
