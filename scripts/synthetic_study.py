"""Synthetic ultrasound DICOM instances (PS3.10 files) for the demo, tests and benchmarks. No real patient."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

SOP_CLASSES = {
    ("US", False): pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image Storage
    ("US", True): pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.3.1"),  # Ultrasound Multi-frame Image Storage
    ("CT", False): pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
}


def _ultrasound_region(rows: int, cols: int) -> Dataset:
    """One calibrated region: 0.1 mm per pixel, so a specialist can measure on the image."""
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = cols - 1
    region.RegionLocationMaxY1 = rows - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.01
    region.PhysicalDeltaY = 0.01
    return region


def make_us_instance(
    path: str | Path | None = None,
    *,
    study_uid: str,
    series_uid: str,
    frames: int = 1,
    patient_name: str = "DOE^JANE",
    patient_id: str = "MRN1",
    birth_date: str = "19800101",
    sex: str = "F",
    modality: str = "US",
    sop_uid: str | None = None,
    view_label: str | None = None,
    rows: int = 64,
    cols: int = 64,
    calibrated: bool = True,
    burned_in_annotation: str = "NO",
    accession_number: str | None = None,
) -> bytes:
    """An ultrasound image (or a cine clip when frames > 1) as PS3.10 bytes; written to `path` if given."""
    sop_class = SOP_CLASSES.get((modality, frames > 1), SOP_CLASSES[("US", False)])
    sop_uid = pydicom.uid.UID(sop_uid) if sop_uid else pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.StudyDate = "20261120"
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession_number or ""  # Type 2 attributes are present, empty when unknown
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Manufacturer = "SYNTHETIC"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    if modality == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "PELVIC", "0001"]  # PS3.3 C.8.5.6.1.1: 2D imaging
        ds.BodyPartExamined = "PELVIS"  # not a paired part: no Laterality (General Series, Type 2C)
    ds.BurnedInAnnotation = burned_in_annotation
    if view_label:
        ds.ImageComments = view_label
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if modality == "US" and calibrated:
        ds.SequenceOfUltrasoundRegions = Sequence([_ultrasound_region(rows, cols)])
    rng = np.random.default_rng(int(sop_uid.rsplit(".", 1)[-1]) % (2**32))
    pixels = rng.integers(0, 255, size=(frames, rows, cols) if frames > 1 else (rows, cols), dtype=np.uint8)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = Tag("FrameTime")  # Multi-frame and Cine modules
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


BASIC_TEXT_SR = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.11")


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def make_sr_report(
    sections: dict[str, str],
    *,
    study_uid: str,
    patient_name: str = "DOE^JANE",
    patient_id: str = "MRN1",
    birth_date: str = "19800101",
    sex: str = "F",
) -> bytes:
    """The first reader's report as a DICOM Basic Text SR: one CONTAINER, a TEXT item per section."""
    sop_uid = pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("report.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        patient_name,
        patient_id,
        birth_date,
        sex,
    )
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261120", "101500", "1"
    ds.AccessionNumber = ds.ReferringPhysicianName = ""  # Type 2: present, empty when unknown
    ds.Manufacturer = "SYNTHETIC"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.ContentDate, ds.ContentTime = "20261120", "110000"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "Diagnostic imaging report", "LN")])
    items = []
    for heading, text in sections.items():
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code("121071", heading)])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
