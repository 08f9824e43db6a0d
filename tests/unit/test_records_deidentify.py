"""PS3.15 Table E.1-1 actions inside sequences: what a dummy leaves of a well-known UID, and of private attributes."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.uid
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from services.records.deidentify import PixelCleaning, UidMap, deidentified_header, deidentify, pixel_cleaning
from tests.dicom_factory import make_us_instance


def test_a_dummied_sequence_keeps_the_uids_the_standard_defines_and_replaces_the_instances() -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.SOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.6.1")
    dataset.SOPInstanceUID = dataset.StudyInstanceUID = "1.2.999.1"
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    reference.ReferencedSOPInstanceUID = "1.2.999.2"
    reference.TextValue = "seen by Dr Kim"
    dataset.ContentSequence = Sequence([reference])  # D in the table: kept, every value replaced

    deidentify(dataset, UidMap())

    [item] = dataset.ContentSequence
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    assert item.ReferencedSOPInstanceUID != "1.2.999.2" and item.TextValue == "DEIDENTIFIED"


def test_private_attributes_inside_a_dummied_sequence_are_removed_not_dummied() -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.SOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.6.1")
    dataset.SOPInstanceUID = dataset.StudyInstanceUID = "1.2.999.1"
    observer = Dataset()
    observer.VerifyingObserverName = "Kim^Dana"
    observer.private_block(0x0011, "ACME US", create=True).add_new(0x01, "LO", "Kim's workstation 3")
    nested = Dataset()
    nested.private_block(0x0013, "ACME US", create=True).add_new(0x02, "LO", "room 12")
    nested.CodeMeaning = "reader"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([nested])
    dataset.VerifyingObserverSequence = Sequence([observer])  # D in the table: kept, its values replaced

    deidentify(dataset, UidMap())

    [item] = dataset.VerifyingObserverSequence
    [inner] = item.VerifyingObserverIdentificationCodeSequence
    assert [element.tag for element in item if element.tag.is_private] == []
    assert [element.tag for element in inner if element.tag.is_private] == []
    assert item.VerifyingObserverName == "DEIDENTIFIED" and inner.CodeMeaning == "DEIDENTIFIED"


@pytest.mark.parametrize(
    "syntax",
    [
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
    ],
    ids=["explicit", "implicit", "deflated"],
)
def test_native_frames_in_each_uncompressed_syntax_are_cleaned_not_withheld(
    syntax: pydicom.uid.UID, tmp_path: Path
) -> None:
    clip = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid="1.2.999.3", series_uid="1.2.999.3.1", frames=3))
    )
    clip.BurnedInAnnotation = "YES"
    clip.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "clip.dcm"
    clip.save_as(path, enforce_file_format=True)

    header, pixel_length = deidentified_header(path, UidMap())

    assert pixel_length == len(clip.PixelData)
    assert isinstance(pixel_cleaning(header, pixel_length), PixelCleaning)
