"""An instance handed out (WADO-RS, the de-identified export) has its header rewritten and its pixels copied
byte for byte, as Explicit VR Little Endian where it was stored implicit (and, exported, deflated)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.uid
import pytest

from services.records.deidentify import UidMap, deidentified_chunks
from services.records.rewrite import rewritten_chunks
from tests.dicom_factory import make_us_instance


def stored_as(
    tmp_path: Path, syntax: pydicom.uid.UID, *, pixels: bool = True
) -> tuple[Path, pydicom.Dataset]:
    original = tmp_path / "original.dcm"
    make_us_instance(original, study_uid="1.2.3", series_uid="1.2.3.1", frames=2)
    dataset = pydicom.dcmread(original)
    if not pixels:
        del dataset.PixelData
    dataset.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "stored.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, dataset


@pytest.mark.parametrize(
    "syntax",
    [
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
    ],
    ids=["explicit", "implicit", "deflated"],
)
def test_the_export_is_explicit_vr_with_the_pixels_untouched(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    path, stored = stored_as(tmp_path, syntax)
    exported = pydicom.dcmread(io.BytesIO(b"".join(deidentified_chunks(path, UidMap()))))
    # Deflated too: no general purpose media profile (PS3.11) has it, and media readers do not read it.
    assert exported.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert exported.PixelData == stored.PixelData
    assert exported.PatientIdentityRemoved == "YES" and exported.PatientName != stored.PatientName


def test_an_implicit_instance_without_pixels_is_rewritten_whole(tmp_path: Path) -> None:
    path, _ = stored_as(tmp_path, pydicom.uid.ImplicitVRLittleEndian, pixels=False)

    def mark(dataset: pydicom.Dataset) -> None:
        dataset.StudyDescription = "handed out"

    handed = pydicom.dcmread(io.BytesIO(b"".join(rewritten_chunks(path, mark))))
    assert handed.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert handed.StudyDescription == "handed out" and "PixelData" not in handed


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "encapsulated"])
def test_the_export_stops_at_the_end_of_the_pixel_data(tmp_path: Path, encapsulated: bool) -> None:
    """What follows Pixel Data (digital signatures, trailing padding: X in PS3.15 Table E.1-1) is not copied;
    the pixels are, byte for byte, whether native or fragments."""
    path, stored = stored_as(tmp_path, pydicom.uid.ExplicitVRLittleEndian)
    if encapsulated:
        stored.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
        stored.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8frame1\xff\xd9", b"\xff\xd8frame2\xff\xd9"])
        stored["PixelData"].VR = "OB"
    stored.DataSetTrailingPadding = b"MKRPAD01"
    stored.save_as(path, enforce_file_format=True)

    exported = b"".join(deidentified_chunks(path, UidMap()))
    assert b"MKRPAD01" not in exported
    assert pydicom.dcmread(io.BytesIO(exported)).PixelData == stored.PixelData


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian],
    ids=["explicit", "implicit"],
)
def test_pixels_are_cleaned_one_frame_at_a_time(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    """The cleaner sees each frame alone (a long clip is never in memory whole) and its output goes out."""
    path, stored = stored_as(tmp_path, syntax)
    frame_bytes = stored.Rows * stored.Columns
    seen: list[int] = []

    def blank(frame: bytes) -> bytes:
        seen.append(len(frame))
        return bytes(len(frame))

    exported = b"".join(
        rewritten_chunks(path, lambda _: None, after_pixels=False, frames=(frame_bytes, blank))
    )
    assert seen == [frame_bytes, frame_bytes]
    assert pydicom.dcmread(io.BytesIO(exported)).PixelData == bytes(2 * frame_bytes)
