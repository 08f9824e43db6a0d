"""IHE Import Reconciliation: does an import belong to the case's patient, and our identifiers on it.

Originals are stored as received; coercion is applied to every instance we hand out (download,
WADO-RS), so the stored bytes stay the evidence of what arrived and a re-upload deduplicates.

Matching compares family name, first given name, birth date and sex (each only where the instance
carries it) and the facility's patient id (our `mrn`). Coercion sets Patient ID, Issuer of Patient ID
and Accession Number to our values and keeps the originals in Original Attributes Sequence.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from services.records.classify import PatientIdentity

OUR_ISSUER = "SECONDOPINION"
SEX_CODES = {"female": "F", "male": "M", "other": "O"}
CHUNK_BYTES = 1024 * 1024


def _letters(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Z]", "", folded.upper())


def _name_matches(dicom_name: str, patient: dict[str, Any]) -> bool:
    family, _, rest = dicom_name.partition("^")
    given = rest.split("^")[0].split(" ")[0]
    if _letters(family) != _letters(patient["family_name"]):
        return False
    return not given or _letters(given) == _letters(str(patient["given_name"]).split(" ")[0])


def differences(identities: Iterable[PatientIdentity], patient: dict[str, Any]) -> list[str]:
    """The DICOM attribute names in which any instance disagrees with the case's patient (no values)."""
    found: set[str] = set()
    birth = str(patient["birth_date"]).replace("-", "")
    sex = SEX_CODES.get(str(patient["sex"]))
    for identity in identities:
        if identity.name and not _name_matches(identity.name, patient):
            found.add("PatientName")
        if identity.birth_date and identity.birth_date != birth:
            found.add("PatientBirthDate")
        if identity.sex and sex and identity.sex != sex:
            found.add("PatientSex")
        if identity.patient_id and identity.patient_id != patient["mrn"]:
            found.add("PatientID")
    return sorted(found)


def our_identifiers(case_id: str, exam: dict[str, Any]) -> dict[str, str]:
    accession = exam.get("accession_number") or case_id.replace("-", "")[:16].upper()
    return {"PatientID": f"SO-{case_id}"[:64], "IssuerOfPatientID": OUR_ISSUER, "AccessionNumber": accession}


def coerced_chunks(source: Path, values: dict[str, str], modified_at: datetime) -> Iterator[bytes]:
    """`source` with `values` set and the originals kept, as chunks: the header is rewritten and the
    pixel data copied as bytes, so memory stays bounded by the header whatever the file's size."""
    with source.open("rb") as fp:
        dataset = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
        size = fp.seek(0, io.SEEK_END)
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    pixel_header = b""
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        dataset = pydicom.dcmread(source)  # a deflated body cannot be spliced; such files are rare and small
        pixel_offset = -1
    elif syntax == pydicom.uid.ImplicitVRLittleEndian:
        # Not to be used with web services (PS3.18 8.7.3): handed out as Explicit VR Little Endian.
        pixel_header, pixel_offset = _explicit_little_pixel_header(source, pixel_offset, size)
        if pixel_offset < 0:
            dataset = pydicom.dcmread(source)
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    _coerce(dataset, values, modified_at)
    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    yield header.getvalue() + pixel_header
    if pixel_offset < 0:
        return
    with source.open("rb") as fp:
        fp.seek(pixel_offset)
        while chunk := fp.read(CHUNK_BYTES):
            yield chunk


def _explicit_little_pixel_header(source: Path, offset: int, size: int) -> tuple[bytes, int]:
    """For an Implicit VR Little Endian file whose native Pixel Data is its last element: that element's
    header in Explicit VR Little Endian and where its value starts; else (b"", -1) (read it whole)."""
    with source.open("rb") as fp:
        fp.seek(offset)
        head = fp.read(8)
    if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
        return b"", -1 if len(head) else offset  # no pixel data: the header says it all
    length = int.from_bytes(head[4:8], "little")
    if length == 0xFFFFFFFF or offset + 8 + length != size:
        return b"", -1
    return head[:4] + b"OW\x00\x00" + head[4:8], offset + 8


def coerced_header(source: Path, values: dict[str, str], modified_at: datetime) -> Dataset:
    """The header (no pixel data) of `source` as we hand it out: our identifiers, originals kept."""
    dataset = pydicom.dcmread(source, stop_before_pixels=True)
    _coerce(dataset, values, modified_at)
    return dataset


def _coerce(dataset: Dataset, values: dict[str, str], modified_at: datetime) -> None:
    original = Dataset()
    for keyword in values:
        setattr(original, keyword, dataset.get(keyword) or "")
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([original])
    item.AttributeModificationDateTime = modified_at.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = OUR_ISSUER
    item.SourceOfPreviousValues = str(dataset.get("IssuerOfPatientID") or "")[:64]
    item.ReasonForTheAttributeModification = "COERCE"
    history = list(dataset.get("OriginalAttributesSequence") or [])
    dataset.OriginalAttributesSequence = Sequence([*history, item])
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
