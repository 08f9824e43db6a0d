"""The integrated report as a DICOM Encapsulated PDF instance in the original study (PS3.3 A.45.1).

Issued to records (`document.encapsulated_report`) with the identity intake gave; records places it into the
study it reads. That placed copy is the one handed out, by this service's download too (records_copy.py)."""

from __future__ import annotations

import io
import re
import unicodedata
from datetime import date, datetime

import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from contracts.commands import MatchSpecialist
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.review.report_pdf import TITLE

DICOM = "application/dicom"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
TRANSFER_SYNTAX = ExplicitVRLittleEndian  # what the report instance is written in, and sent to a PACS in
SERIES_NUMBER = 9001  # high, so viewers list the report after the images
# The PDF's title in ASCII (no dash of its own): placed into a study, the instance takes the images' character
# set (Latin-1 and the like) where all its text fits, so that the patient's name is theirs byte for byte.
DOCUMENT_TITLE = TITLE.replace(" \u2014 ", " - ")
# PN (PS3.5 6.2): a component group (family^given) is at most 64 characters (characters, not bytes, in
# UTF-8); the `^` between the two takes one. A name too long keeps the family name (what a PACS sorts and
# searches by) and at least this much of the given name (a first given name).
PN_GROUP_CHARS = 64
VIRAMA = 9  # the canonical combining class of the viramas (Devanagari ्, ...): they join consonants
JOINERS = "\u200c\u200d"
GIVEN_NAME_AT_LEAST = 16

log = structlog.get_logger(__name__)


def encapsulated_pdf(
    *, pdf: bytes, request: MatchSpecialist, report_id: str, version: int, issued: datetime
) -> bytes:
    """A Part 10 file; the same report version always gets the same UIDs, so a re-send replaces it."""
    patient, study = request.patient, request.study
    sop_instance_uid = UID(report_instance_uid(report_id, version))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = TRANSFER_SYNTAX
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names and the title may need it
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = _person_name(patient.family_name, patient.given_name, report_id=report_id)
    ds.PatientID = patient.mrn
    ds.PatientBirthDate = _date(patient.birth_date)
    ds.PatientSex = {"female": "F", "male": "M", "other": "O"}.get(patient.sex.value, "")
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[report_id, "series"])
    ds.StudyDate = _date(request.exam.performed_on)
    ds.StudyTime = ""
    ds.AccessionNumber = _short_string(request.exam.accession_number)
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.Modality = "DOC"
    ds.SeriesNumber = SERIES_NUMBER
    ds.InstanceNumber = version
    ds.Manufacturer = "secondopinion"
    ds.ConversionType = "WSD"
    ds.TimezoneOffsetFromUTC = issued.strftime("%z")  # DA/TM below are in this offset (PS3.3 Table C.12-1)
    ds.ContentDate = _date(issued.date())
    ds.ContentTime = issued.strftime("%H%M%S")
    ds.AcquisitionDateTime = issued.strftime("%Y%m%d%H%M%S%z")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = DOCUMENT_TITLE if version == 1 else f"{DOCUMENT_TITLE} (addendum {version - 1})"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging study")]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB must have even length: pad with one NUL, as PS3.3 allows for the Encapsulated Document.
    ds.EncapsulatedDocument = pdf + b"\0" if len(pdf) % 2 else pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def report_instance_uid(report_id: str, version: int) -> str:
    """The SOP Instance UID this service issues a report version under (records finds its copy by it)."""
    return str(generate_uid(entropy_srcs=[report_id, str(version), "instance"]))


def _date(value: date) -> str:
    """DA (PS3.5 6.2): YYYYMMDD, the year in four digits (strftime("%Y") writes 984 for the year 984)."""
    return value.isoformat().replace("-", "")


def _person_name(family: str, given: str, *, report_id: str) -> str:
    """PN (PS3.5 6.2): `^` `=` `\\` are delimiters, not text, and a component group is at most 64 chars.

    A name that does not fit is cut per component, never by dropping one: the given name keeps what the
    family name leaves, and at least GIVEN_NAME_AT_LEAST characters (a family name of 64 or more used to
    leave it out entirely). The full name is on the PDF it encapsulates."""
    family, given = (" ".join(re.sub(r"[\\^=]", " ", part).split()) for part in (family, given))
    room = PN_GROUP_CHARS - 1
    if len(family) + len(given) > room:
        keep_given = min(len(given), max(room - len(family), GIVEN_NAME_AT_LEAST))
        kept = _cut(family, room - keep_given), _cut(given, keep_given)
        log.warning(
            "review.dicom_patient_name_shortened",
            report_id=report_id,
            family_chars=(len(family), len(kept[0])),
            given_chars=(len(given), len(kept[1])),
            limit=PN_GROUP_CHARS,
        )
        family, given = kept
    return f"{family}^{given}"


def _cut(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, less the start of a syllable they would split: a letter is not
    kept without its marks (Devanagari कि without ि), nor a consonant with the virama that joins it to one
    left out (क्ष as क्)."""
    while 0 < chars < len(text) and (
        unicodedata.category(text[chars]).startswith("M")
        or text[chars] in JOINERS
        or unicodedata.combining(text[chars - 1]) == VIRAMA
        or text[chars - 1] in JOINERS
    ):
        chars -= 1
    return text[:chars].rstrip()


def _short_string(value: str | None) -> str:
    """SH (PS3.5 6.2): at most 16 chars, no backslash. A value that does not fit is not the study's
    DICOM Accession Number, so the Type 2 attribute is left empty rather than written invalid."""
    return value if value and len(value) <= 16 and "\\" not in value else ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code
