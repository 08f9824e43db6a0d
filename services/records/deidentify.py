"""De-identified export for teaching and QA: DICOM PS3.15 Annex E Basic Application Confidentiality
Profile (method code 113100 recorded in each instance), no options retained.

Attributes the profile names are zeroed (Z), removed (X) or have their UIDs replaced (U, consistently
within one export, from a random salt so they cannot be linked back); private tags and overlays go.
Pixel data is copied as bytes: an instance whose pixels may carry burned-in text (Burned In Annotation
not "NO") is withheld, because no pixel-cleaning rule exists for it (the Clean Pixel Data Option).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from services.records.rewrite import rewritten_chunks

BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
METHOD = "DICOM PS3.15 E.1 Basic Application Confidentiality Profile"

ZEROED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
    "ContentDate",
    "ContentTime",
)
# Z allows "a non-zero length value that may be a dummy value" (PS3.15 E.1): these are Type 1 in the
# PATIENT and STUDY records of the export's DICOMDIR (PS3.3 F.5), so they get one.
DUMMIES = {"PatientID": "DEIDENTIFIED", "StudyID": "1", "StudyDate": "19000101", "StudyTime": "000000"}
REMOVED = (
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "PatientComments",
    "PatientReligiousPreference",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "MedicalRecordLocator",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PhysiciansOfRecord",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "DerivationDescription",
    "RequestAttributesSequence",
    "OriginalAttributesSequence",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "RequestedProcedureID",
)
REPLACED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "SynchronizationFrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
    "ReferencedFrameOfReferenceUID",
    "IrradiationEventUID",
)


class UidMap:
    """Replacement UIDs, the same for the same original within one export."""

    def __init__(self) -> None:
        self._salt = secrets.token_hex(16)
        self._map: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        if uid not in self._map:
            self._map[uid] = str(pydicom.uid.generate_uid(entropy_srcs=[self._salt, uid]))
        return self._map[uid]


def may_export(burned_in_annotation: str | None) -> bool:
    return (burned_in_annotation or "").upper() == "NO"


def deidentified_header(source: Path, uids: UidMap) -> tuple[Dataset, int]:
    """The de-identified header of `source` (no pixel data) and where its pixel data starts."""
    with source.open("rb") as fp:
        dataset = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
    deidentify(dataset, uids)
    return dataset, pixel_offset


def deidentified_chunks(source: Path, uids: UidMap) -> Iterator[bytes]:
    """The de-identified instance as chunks: header rewritten, pixel data copied as bytes (Explicit VR
    Little Endian, as PS3.11's general purpose media profiles want, where the file was implicit)."""
    return rewritten_chunks(source, lambda dataset: deidentify(dataset, uids))


def deidentify(dataset: Dataset, uids: UidMap) -> None:
    dataset.remove_private_tags()
    _clean(dataset, uids)
    for tag in [element.tag for element in dataset if 0x6000 <= element.tag.group <= 0x60FF]:
        del dataset[tag]  # overlays can carry text drawn over the image
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if dataset.get("SOPInstanceUID") and dataset.get("StudyInstanceUID"):  # an instance, not a sequence item
        for keyword, dummy in DUMMIES.items():
            if not dataset.get(keyword):
                setattr(dataset, keyword, dummy)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = Sequence([code])


def _clean(dataset: Dataset, uids: UidMap) -> None:
    for keyword in REMOVED:
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword in ZEROED:
        if keyword in dataset:
            dataset.data_element(keyword).value = DUMMIES.get(keyword, "")  # type: ignore[union-attr]
    for keyword in REPLACED_UIDS:
        if keyword in dataset and dataset.data_element(keyword).value:  # type: ignore[union-attr]
            setattr(dataset, keyword, uids(str(getattr(dataset, keyword))))
    for element in list(dataset):
        if element.VR == "SQ":
            for item in element.value or []:
                if isinstance(item, Dataset):
                    _clean(item, uids)
