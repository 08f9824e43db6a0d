"""What an uploaded file is: the original report (PDF or UTF-8 text) or a DICOM instance.

Anything else is refused with a message naming the file's position in the upload, never its name
(file names often carry the patient's name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pypdf import PdfReader

from services.common.errors import RecordsRejected
from services.records.models import FileKind
from services.records.store import ReceivedFile, human_size

DICOM_TYPE = "application/dicom"
PDF_TYPE = "application/pdf"
TEXT_TYPE = "text/plain; charset=utf-8"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
MAX_TEXT_REPORT_BYTES = 1024 * 1024
REQUIRED_DICOM_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class DicomHeader:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    number_of_frames: int


@dataclass(frozen=True)
class ClassifiedFile:
    received: ReceivedFile
    kind: FileKind
    content_type: str
    dicom: DicomHeader | None = None


class _Unusable(Exception):
    """Why a file cannot be used, phrased to follow "file 3 of 5"."""


def classify(received: ReceivedFile, *, total: int, declared_type: str | None = None) -> ClassifiedFile:
    """Classify and validate one received file; raises RecordsRejected if it is neither report nor DICOM."""
    try:
        return _classify(received, declared_type)
    except _Unusable as exc:
        raise RecordsRejected(
            f"file {received.position} of {total} {exc}; nothing from this upload was stored"
        ) from None


def _classify(received: ReceivedFile, declared_type: str | None) -> ClassifiedFile:
    if received.size_bytes == 0:
        raise _Unusable("is empty")
    has_dicm_prefix = received.head[128:132] == b"DICM"
    declared_dicom = (declared_type or "").split(";")[0].strip().lower() == DICOM_TYPE
    # The content decides, not the client's declared type, except that declared DICOM must be DICOM.
    if has_dicm_prefix or declared_dicom:
        return ClassifiedFile(received, FileKind.DICOM, DICOM_TYPE, read_dicom_header(received.path))
    if received.head.startswith(b"%PDF"):
        check_pdf(received.path)
        return ClassifiedFile(received, FileKind.REPORT, PDF_TYPE)
    if received.utf8_text:
        if received.size_bytes > MAX_TEXT_REPORT_BYTES:
            raise _Unusable(
                f"is a text file larger than {human_size(MAX_TEXT_REPORT_BYTES)}, too large for a report; "
                "upload the report as PDF"
            )
        return ClassifiedFile(received, FileKind.REPORT, TEXT_TYPE)
    return ClassifiedFile(received, FileKind.DICOM, DICOM_TYPE, read_dicom_header(received.path))


def read_dicom_header(path: Path) -> DicomHeader:
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise _Unusable("is not DICOM (no DICM prefix)") from None
    except Exception:
        raise _Unusable("is not a readable DICOM file (it is truncated or corrupt)") from None
    try:
        if str(dataset.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            raise _Unusable("is a DICOMDIR index, not an image; upload the image files it lists")
        uids = [str(dataset.get(keyword) or "").strip() for keyword in REQUIRED_DICOM_UIDS]
        modality = str(dataset.get("Modality") or "").strip().upper()
        frames = int(dataset.get("NumberOfFrames") or 1)
    except _Unusable:
        raise
    except Exception:
        raise _Unusable("is not a readable DICOM file (its header is corrupt)") from None
    for keyword, uid in zip(REQUIRED_DICOM_UIDS, uids, strict=True):
        if not uid or len(uid) > 64:
            raise _Unusable(f"is DICOM without a valid {keyword}")
    if not modality or len(modality) > 16:
        raise _Unusable("is DICOM without a valid Modality")
    study, series, sop = uids
    return DicomHeader(study, series, sop, modality, max(frames, 1))


def check_pdf(path: Path) -> None:
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise _Unusable("is a password-protected PDF; upload an unprotected copy")
        if len(reader.pages) == 0:
            raise _Unusable("is a PDF without pages")
        _extract_text(reader)  # the text goes into records.assembled: fail now, not at assembly
    except _Unusable:
        raise
    except Exception:
        raise _Unusable("starts like a PDF but cannot be read (it is truncated or corrupt)") from None


def pdf_text(path: Path) -> str:
    return _extract_text(PdfReader(path))


def _extract_text(reader: PdfReader) -> str:
    return "\n".join(page.extract_text() or "" for page in reader.pages).strip()
