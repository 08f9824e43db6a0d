"""What an uploaded file is: the original report (PDF, UTF-8 text or FHIR; a DICOM SR arrives as DICOM) or a DICOM instance.

Anything else is refused with a message naming the file's position in the upload, never its name
(file names often carry the patient's name).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path

import pydicom
import pydicom.filereader
import pydicom.uid
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pypdf import PdfReader

from services.common.errors import RecordsRejected, human_size
from services.records.fhir_records import (
    FHIR_TYPE,
    FhirRecord,
    InvalidFhir,
    NotFhir,
    NotJson,
    looks_like_json,
    read_fhir,
)
from services.records.models import FileKind
from services.records.store import ReceivedFile

DICOM_TYPE = "application/dicom"
PDF_TYPE = "application/pdf"
TEXT_TYPE = "text/plain; charset=utf-8"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
MAX_TEXT_REPORT_BYTES = 1024 * 1024
REQUIRED_DICOM_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PIXEL_DATA_TAG, PIXEL_DATA_TAG_BIG_ENDIAN = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"


@dataclass(frozen=True)
class PatientIdentity:
    """What an instance says about its patient (PHI: kept out of logs and error bodies)."""

    name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class DicomHeader:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    number_of_frames: int
    identity: PatientIdentity = PatientIdentity()
    accession_number: str = ""
    has_regions: bool = False
    burned_in_annotation: str = ""
    pixel_bytes: int = 0
    sop_class_uid: str = ""
    study_date: str = ""
    # What the instance says it shows (ViewCodeSequence, ImageComments, SeriesDescription).
    view_label: str = ""
    issuer_of_patient_id: str = ""
    header_bytes: int = 0  # the file up to its pixel data (all of it without any)


@dataclass(frozen=True)
class ClassifiedFile:
    received: ReceivedFile
    kind: FileKind
    content_type: str
    dicom: DicomHeader | None = None
    record_type: str | None = None
    record_date: date | None = None


class Unusability(StrEnum):
    """What kind of problem makes a file unusable (a STOW-RS Failure Reason is chosen by it)."""

    UNREADABLE = "unreadable"  # not DICOM, corrupt, truncated, a parser that gave up
    INCOMPLETE = "incomplete"  # DICOM without the UIDs or Modality every stored instance needs
    TOO_LARGE = "too_large"  # more pixel data than the budget of one instance


class Unusable(Exception):
    """Why a file cannot be used, phrased to follow "file 3 of 5"."""

    def __init__(self, problem: str, kind: Unusability = Unusability.UNREADABLE) -> None:
        super().__init__(problem)
        self.kind = kind

    def __reduce__(self) -> tuple[type[Unusable], tuple[str, Unusability]]:
        return type(self), (str(self), self.kind)  # the kind survives a header parsed in a worker process


class FileRefused(RecordsRejected):
    """One file refused: `label` names it ("file 3 of 5", "part 2 of the request"), `problem` says what is
    wrong with it (never its name or content), `kind` what sort of problem that is."""

    def __init__(self, label: str, problem: str, kind: Unusability) -> None:
        super().__init__(f"{label} {problem}; nothing from this upload was stored")
        self.label, self.problem, self.kind = label, problem, kind


_Unusable = Unusable
HeaderReader = Callable[[Path], "DicomHeader"]


class _DicomDir(Exception):
    """The file is a DICOMDIR (IHE PDI index)."""


def classify(
    received: ReceivedFile,
    *,
    total: int,
    declared_type: str | None = None,
    max_pixel_bytes: int | None = None,
    label: str | None = None,
    read_header: HeaderReader | None = None,
    max_header_bytes: int | None = None,
) -> ClassifiedFile:
    """Classify and validate one received file; raises RecordsRejected if it is neither report nor DICOM.

    `label` names the file in errors (default "file 3 of 5"); DICOMDIR comes back as kind DICOMDIR.
    """
    try:
        classified = _classify(received, declared_type, read_header or read_dicom_header)
        if classified.dicom:
            check_budget(classified.dicom, max_pixel_bytes, max_header_bytes)
        return classified
    except _DicomDir:
        return ClassifiedFile(received, FileKind.DICOMDIR, DICOM_TYPE)
    except _Unusable as exc:
        raise FileRefused(label or f"file {received.position} of {total}", str(exc), exc.kind) from None


def check_budget(header: DicomHeader, max_pixel_bytes: int | None, max_header_bytes: int | None) -> None:
    """Refuse (Unusable, TOO_LARGE) an instance beyond what one may declare: its pixel data, or its header.
    The header (every element before the pixel data) is read whole wherever the instance is handed out,
    so a huge private element there would cost the records process that much memory at every download."""
    if max_pixel_bytes is not None and header.pixel_bytes > max_pixel_bytes:
        raise _Unusable(
            f"declares {human_size(header.pixel_bytes)} of pixel data, more than the "
            f"{human_size(max_pixel_bytes)} budget of one instance; ask the facility for an export with fewer frames",
            Unusability.TOO_LARGE,
        )
    if max_header_bytes is not None and header.header_bytes > max_header_bytes:
        raise _Unusable(
            f"carries {human_size(header.header_bytes)} before its pixel data (private elements or an "
            f"encapsulated document), more than the {human_size(max_header_bytes)} one instance may; ask the "
            "facility for an export without the private data",
            Unusability.TOO_LARGE,
        )


def _classify(received: ReceivedFile, declared_type: str | None, read_header: HeaderReader) -> ClassifiedFile:
    if received.size_bytes == 0:
        raise _Unusable("is empty")
    has_dicm_prefix = received.head[128:132] == b"DICM"
    declared_dicom = (declared_type or "").split(";")[0].strip().lower() == DICOM_TYPE
    # The content decides, not the client's declared type, except that declared DICOM must be DICOM.
    if has_dicm_prefix or declared_dicom:
        return ClassifiedFile(received, FileKind.DICOM, DICOM_TYPE, read_header(received.path))
    if received.head.startswith(b"%PDF"):
        check_pdf(received.path)
        return ClassifiedFile(received, FileKind.REPORT, PDF_TYPE)
    fhir = _fhir_record(received) if received.utf8_text and looks_like_json(received.head) else None
    if fhir is not None:
        kind = FileKind.REPORT if fhir.resource_type == "DiagnosticReport" else FileKind.CLINICAL
        return ClassifiedFile(
            received, kind, FHIR_TYPE, record_type=fhir.resource_type, record_date=fhir.record_date
        )
    if received.utf8_text:
        if received.size_bytes > MAX_TEXT_REPORT_BYTES:
            raise _Unusable(
                f"is a text file larger than {human_size(MAX_TEXT_REPORT_BYTES)}, too large for a report; "
                "upload the report as PDF"
            )
        return ClassifiedFile(received, FileKind.REPORT, TEXT_TYPE)
    return ClassifiedFile(received, FileKind.DICOM, DICOM_TYPE, read_header(received.path))


def _fhir_record(received: ReceivedFile) -> FhirRecord | None:
    """A FHIR record, or None for text that only starts like JSON (a text report)."""
    try:
        return read_fhir(received.path, received.size_bytes)
    except NotJson:
        return None
    except InvalidFhir as exc:
        raise _Unusable(str(exc)) from None
    except NotFhir:
        raise _Unusable("is JSON but not a FHIR DiagnosticReport, Observation or DocumentReference") from None


class _DeclaredTooLong(Exception):
    pass


class _LengthCheckedReader(io.BufferedReader):
    """Refuses a read longer than what is left of the file: a hostile declared length allocates nothing."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = path.stat().st_size

    def read(self, size: int | None = -1, /) -> bytes:
        # The preamble and tag headers are read past the end on purpose (that is how pydicom finds EOF).
        if size is not None and size > 256 and self.tell() + size > self._size:
            raise _DeclaredTooLong()
        return super().read(size)


def read_dicom_header(path: Path) -> DicomHeader:
    try:
        with _LengthCheckedReader(path) as fp:
            dataset = pydicom.dcmread(fp, stop_before_pixels=True)
            header_bytes = fp.tell()
            pixel_end, pixel_length = _pixel_data(fp, dataset)
    except InvalidDicomError:
        raise _Unusable("is not DICOM (no DICM prefix)") from None
    except _DeclaredTooLong:
        raise _Unusable(
            "is not a readable DICOM file (an element declares a length beyond the end of the file)"
        ) from None
    except MemoryError:
        raise  # an isolated parser turns this into its own rejection
    except Exception:
        raise _Unusable("is not a readable DICOM file (it is truncated or corrupt)") from None
    try:
        if str(dataset.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            raise _DicomDir()
        uids = [_single_value(dataset, keyword) for keyword in REQUIRED_DICOM_UIDS]
        modality = str(dataset.get("Modality") or "").strip().upper()
        frames = int(dataset.get("NumberOfFrames") or 1)
        identity = PatientIdentity(
            name=_text(dataset, "PatientName"),
            patient_id=_text(dataset, "PatientID"),
            birth_date=_text(dataset, "PatientBirthDate"),
            sex=_text(dataset, "PatientSex").upper(),
        )
        extra = {
            "accession_number": _text(dataset, "AccessionNumber"),
            "has_regions": len(dataset.get("SequenceOfUltrasoundRegions") or []) > 0,
            "burned_in_annotation": _text(dataset, "BurnedInAnnotation").upper()[:8],
            "pixel_bytes": _declared_pixel_bytes(dataset, frames),
            "sop_class_uid": _text(dataset, "SOPClassUID")[:64],
            "study_date": _text(dataset, "StudyDate")[:8],
            "view_label": _view_label(dataset),
            "issuer_of_patient_id": _text(dataset, "IssuerOfPatientID")[:64],
            "header_bytes": header_bytes,
        }
    except (_Unusable, _DicomDir):
        raise
    except Exception:
        raise _Unusable("is not a readable DICOM file (its header is corrupt)") from None
    if pixel_end < 0 or pixel_end > path.stat().st_size:
        raise _Unusable("is a truncated DICOM file (its pixel data ends early)")
    if pixel_length is not None and pixel_length < _native_pixel_bytes(dataset, max(frames, 1)):
        raise _Unusable(
            "holds less pixel data than its Rows, Columns, Number of Frames, Samples per Pixel and Bits "
            "Allocated declare (its header does not describe its image); ask the facility for a new export"
        )
    for keyword, uid in zip(REQUIRED_DICOM_UIDS, uids, strict=True):
        if not is_uid(uid):
            raise _Unusable(
                f"is DICOM without a valid {keyword} (a UID is digits and dots, at most 64 characters); "
                "ask the facility for an export with valid UIDs",
                Unusability.INCOMPLETE,
            )
    if not modality or len(modality) > 16:
        raise _Unusable("is DICOM without a valid Modality", Unusability.INCOMPLETE)
    study, series, sop = uids
    return DicomHeader(study, series, sop, modality, max(frames, 1), identity, **extra)  # type: ignore[arg-type]


def is_uid(text: str) -> bool:
    """A UID as PS3.5 9.1 writes it: numeric components separated by dots, at most 64 characters. What the
    WADO-RS paths take (digits and dots) and what our store names an instance by; components with leading
    zeros, which older devices wrote, are let through."""
    return len(text) <= 64 and _UID.fullmatch(text) is not None


def _single_value(dataset: pydicom.Dataset, keyword: str) -> str:
    """An element's one value as text; "" for none or several (a backslash in a UID makes two values)."""
    value = dataset.get(keyword)
    if isinstance(value, MultiValue):
        return ""
    return str(value or "").strip()


def header_or_none(path: Path) -> DicomHeader | None:
    """The header of a usable DICOM instance, or None (the import path refuses it with its own message)."""
    try:
        return read_dicom_header(path)
    except (_Unusable, _DicomDir):
        return None


class _Beginning(io.BytesIO):
    """The first bytes of a file, the rest of it not kept: a read that runs past them is refused, so a value
    they cut is never taken for a whole one."""

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if size is not None and size >= 0 and len(data) < size:
            raise _DeclaredTooLong()
        return data


def meta_uids(source: Path | bytes) -> tuple[str, str]:
    """The SOP Class and SOP Instance UIDs a file's meta header (group 0002) names, each "" where it cannot
    be read: what a refusal can still say about a file that could not be used. `source` is the file, or
    its first bytes when it was not kept. Only the meta header is read, through the length-checked reader,
    so a hostile file costs nothing here either."""
    try:
        with _LengthCheckedReader(source) if isinstance(source, Path) else _Beginning(source) as fp:
            if pydicom.filereader.read_preamble(fp, force=False) is None:
                return "", ""
            meta = pydicom.filereader._read_file_meta_info(fp)
        uids = (meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID"))
    except Exception:
        return "", ""
    return tuple(  # type: ignore[return-value]
        text if is_uid(text := str(uid or "").strip()) else "" for uid in uids
    )


def _pixel_data(fp: io.BufferedReader, dataset: pydicom.Dataset) -> tuple[int, int | None]:
    """Where the pixel data element the header stopped at ends, and the length of its value when it is
    native Pixel Data; (0, None) for no pixel data (an SR, a presentation state) or encapsulated frames
    (their fragments carry their own lengths), -1 for an element header cut short."""
    offset = fp.tell()
    header = fp.read(12)
    if len(header) < 8:
        return 0, None
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax == pydicom.uid.ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", header[4:8])
        start = offset + 8
    else:
        if len(header) < 12:
            return -1, None
        # The retired Explicit VR Big Endian writes lengths most significant byte first; read as little
        # endian, a 4 KiB image's length said 1 MiB and the whole file was refused as truncated.
        order = ">" if syntax == pydicom.uid.ExplicitVRBigEndian else "<"
        (length,) = struct.unpack(f"{order}I", header[8:12])
        start = offset + 12
    if length == 0xFFFFFFFF:
        return 0, None
    pixel_data = header[:4] in (PIXEL_DATA_TAG, PIXEL_DATA_TAG_BIG_ENDIAN)
    return start + length, length if pixel_data else None


def _native_pixel_bytes(dataset: pydicom.Dataset, frames: int) -> int:
    """The bytes native Pixel Data must hold for what the header declares; YBR_FULL_422 keeps two samples
    per pixel, not three (PS3.3 C.7.6.3.1.2)."""
    declared = _declared_pixel_bytes(dataset, frames)
    if _text(dataset, "PhotometricInterpretation").upper() == "YBR_FULL_422":
        return declared * 2 // 3
    return declared


def _view_label(dataset: pydicom.Dataset) -> str:
    views = dataset.get("ViewCodeSequence") or []
    parts = [str(views[0].get("CodeMeaning") or "") if views else ""]
    parts += [_text(dataset, "ImageComments"), _text(dataset, "SeriesDescription")]
    return " | ".join(p for p in parts if p)[:200]


def _text(dataset: pydicom.Dataset, keyword: str) -> str:
    return str(dataset.get(keyword) or "").strip()


def _declared_pixel_bytes(dataset: pydicom.Dataset, frames: int) -> int:
    rows, cols = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    samples, bits = int(dataset.get("SamplesPerPixel") or 1), int(dataset.get("BitsAllocated") or 8)
    return rows * cols * max(frames, 1) * samples * max(bits, 1) // 8


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
