"""IHE Import Reconciliation: does an import belong to the case's patient, and our identifiers on it.

Originals are stored as received; coercion is applied to every instance we hand out (download,
WADO-RS), so the stored bytes stay the evidence of what arrived and a re-upload deduplicates.

Matching compares family name, first given name, birth date and sex (each only where the instance
carries it) and the facility's patient id (our `mrn`). Coercion sets Patient ID, Issuer of Patient ID
and Accession Number to our values and keeps the originals in Original Attributes Sequence. An identifier
and its issuer go together: the facility's Issuer of Patient ID Qualifiers Sequence and Issuer of Accession
Number Sequence describe the facility's values, so they are removed with them (kept among the originals),
or our Patient ID would read as issued by the facility's domain.

Each copy carries the identifiers of the domain it goes to (IHE IRWF: an importer files under its own
identifiers, the originals kept). What records hands out (downloads, WADO-RS, the review service's DICOM
download of the report) is in our domain: our identifiers, images and our report alike. What goes back to
the facility's PACS (report_return.py) is in the facility's: the report as stored, with the Patient ID,
Issuer of Patient ID (and its qualifiers), Accession Number (and its issuer) of the facility's images, so
its PACS files it with the study; exactly the values the handed-out copy keeps as the originals.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records.classify import PatientIdentity
from services.records.rewrite import rewritten_chunks

OUR_ISSUER = "SECONDOPINION"
# What describes the issuer of a coerced identifier (PS3.3 C.7.1.1, C.7.2.1): removed with its value.
ISSUER_DETAILS = {
    "IssuerOfPatientID": "IssuerOfPatientIDQualifiersSequence",
    "AccessionNumber": "IssuerOfAccessionNumberSequence",
}
SEX_CODES = {"female": "F", "male": "M", "other": "O"}
# File meta (PS3.10 7.1) that names a transfer the source file came by, not the copy we write: left out of it.
TRANSFER_META = (
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "SendingPresentationAddress",
    "ReceivingPresentationAddress",
)


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
    """Patient ID, its issuer and Accession Number in our domain: the accession the request named where it
    is a DICOM Accession Number (SH: at most 16 characters, no backslash or control character; the case API
    takes 64), else one made from the case id, so every copy handed out stays valid."""
    accession = str(exam.get("accession_number") or "")
    if not _short_string(accession):
        accession = case_id.replace("-", "")[:16].upper()
    return {"PatientID": f"SO-{case_id}"[:64], "IssuerOfPatientID": OUR_ISSUER, "AccessionNumber": accession}


def _short_string(value: str) -> bool:
    """Whether `value` fits DICOM's SH (PS3.5 6.2): 1 to 16 characters, none a backslash or control one."""
    return 0 < len(value) <= 16 and not any(c == "\\" or unicodedata.category(c) == "Cc" for c in value)


def coerced_chunks(source: Path, values: dict[str, str], modified_at: datetime) -> Iterator[bytes]:
    """`source` with `values` set and the originals kept, as chunks: the header is rewritten and the
    pixel data copied as bytes, so memory stays bounded by the header whatever the file's size."""
    return rewritten_chunks(source, lambda dataset: _coerce(dataset, values, modified_at))


def coerced_header(source: Path, values: dict[str, str], modified_at: datetime) -> Dataset:
    """The header (no pixel data) of `source` as we hand it out: our identifiers, originals kept."""
    dataset = pydicom.dcmread(source, stop_before_pixels=True)
    _coerce(dataset, values, modified_at)
    return dataset


def _coerce(dataset: Dataset, values: dict[str, str], modified_at: datetime) -> None:
    original = Dataset()
    for keyword in values:
        setattr(original, keyword, dataset.get(keyword) or "")
        details = ISSUER_DETAILS.get(keyword)
        if details and details in dataset:
            setattr(original, details, dataset[details].value)
            delattr(dataset, details)
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
    _name_us_the_writer(dataset)


def _name_us_the_writer(dataset: Dataset) -> None:
    """The copy's file meta names us as the implementation and AE that wrote it (PS3.10 7.1: the Implementation
    Class UID identifies "the implementation that wrote this file and its content", the Source AE Title the AE that
    "wrote this file's content (or last updated it)"): we changed its identifiers, so a modality's or the facility's
    PACS's would name a writer that never wrote these bytes. The Private Information, keyed by its creator's UID,
    stays; what described the transfer the original came by goes."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        return
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = OUR_ISSUER
    for keyword in TRANSFER_META:
        if keyword in meta:
            delattr(meta, keyword)
