"""A hostile-input corpus for the records importer, generated on the fly (nothing real, nothing checked in).

Each case is (name, files to upload as (filename, bytes, content type), what the 4xx detail must say).
Also: `cd_folder`, a CD's contents with a DICOMDIR (IHE PDI) as written by pydicom's FileSet.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence

from tests.dicom_factory import make_us_instance

Upload = tuple[str, bytes, str]
ZIP = "application/zip"


@dataclass(frozen=True)
class HostileCase:
    name: str
    files: list[Upload]
    problem: str  # a fragment of the 4xx detail
    status: int = 422


def us(study: str = "1.2.826.0.1.3680043.10.900", **kwargs: object) -> bytes:
    return make_us_instance(None, study_uid=study, series_uid=study + ".1", **kwargs)  # type: ignore[arg-type]


def zip_of(members: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def cd_folder(root: Path, instances: list[bytes], *, extras: dict[str, bytes] | None = None) -> list[Path]:
    """Write a PDI-like CD: DICOMDIR, the images under the FileSet's folders, and viewer junk beside them."""
    fileset = FileSet()
    staging = root.parent / (root.name + "-staging")
    staging.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(instances):
        # The DICOMDIR's STUDY record needs what a modality writes anyway.
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyTime, ds.StudyID, ds.InstanceNumber = "101500", "1", index + 1
        path = staging / f"in{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        fileset.add(path)
    fileset.write(root)
    for name, data in (extras or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return sorted(p for p in root.rglob("*") if p.is_file())


def zip_folder(root: Path) -> bytes:
    return zip_of(
        [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]
    )


def dicomdir_pointing_to(*components: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "EVIL"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = "IMAGE"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ".." is not a valid CS value: that is the point
        record.ReferencedFileID = list(components)
    ds.DirectoryRecordSequence = Sequence([record])
    buffer = io.BytesIO()
    ds.preamble = b"\0" * 128
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_declared_length() -> bytes:
    """Valid file meta, then a private UN element declaring ~4 GiB that the file does not hold."""
    valid = us()
    meta_group_length = struct.unpack("<I", valid[140:144])[0]
    body_start = 144 + meta_group_length
    element = struct.pack("<HH", 0x0011, 0x1010) + b"UN\x00\x00" + struct.pack("<I", 0xFFFFFFF0)
    return valid[:body_start] + element + b"x" * 64


def with_uid(keyword: str, value: bytes) -> bytes:
    """A valid instance whose `keyword` (a UID) holds `value` as sent, however malformed."""
    ds = pydicom.dcmread(io.BytesIO(us()))
    placeholder = "1.2.826.0.1.3680043.10.999999999"
    setattr(ds, keyword, placeholder)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    length = len(placeholder) + len(placeholder) % 2
    padded = value + b"\0" * (len(value) % 2)
    # The dataset's element only (the last one): the file meta keeps its valid copy of a SOP Instance UID.
    before, element, after = buffer.getvalue().rpartition(
        b"UI" + struct.pack("<H", length) + placeholder.encode() + b"\0" * (length - len(placeholder))
    )
    return before + b"UI" + struct.pack("<H", len(padded)) + padded + after


def pixel_data_short_of(rows: int, cols: int) -> bytes:
    """An instance whose Rows and Columns declare more pixels than its (native) Pixel Data holds."""
    ds = pydicom.dcmread(io.BytesIO(us()))
    ds.Rows, ds.Columns = rows, cols
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_private_element(size: int) -> bytes:
    """A valid instance with a private element of `size` bytes before its pixel data."""
    ds = pydicom.dcmread(io.BytesIO(us()))
    ds.add_new((0x0011, 0x0010), "LO", "HOSTILE")
    ds.add_new((0x0011, 0x1001), "OB", b"\0" * size)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def corpus() -> list[HostileCase]:
    image = us()
    bomb = zip_of([("IMAGES/IM1", b"\0" * (64 * 1024 * 1024))])
    many = zip_of([(f"IMG{i:05d}", b"x") for i in range(60)], compression=zipfile.ZIP_STORED)
    truncated_zip = zip_of([("IM1", image), ("IM2", image + b"pad")])[:-40]
    return [
        HostileCase(
            "not dicom", [("a.bin", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")], "is not DICOM"
        ),
        HostileCase(
            "truncated dicom", [("a.dcm", image[: len(image) // 3], "application/dicom")], "truncated"
        ),
        HostileCase(
            "huge declared length",
            [("a.dcm", huge_declared_length(), "application/dicom")],
            "declares a length beyond the end of the file",
        ),
        HostileCase(
            "pixel data beyond the budget",
            [("a.dcm", us(frames=6), "application/dicom")],
            "budget of one instance",
        ),
        HostileCase("zip bomb", [("cd.zip", bomb, ZIP)], "compressed more than"),
        HostileCase("thousands of members", [("cd.zip", many, ZIP)], "more than the 50 one upload may hold"),
        HostileCase(
            "nested archive",
            [("cd.zip", zip_of([("inner.zip", zip_of([("IM1", image)]))]), ZIP)],
            "holds another archive",
        ),
        HostileCase(
            "member escapes",
            [("cd.zip", zip_of([("../../etc/cron.d/x", image)]), ZIP)],
            "leaves the archive root",
        ),
        HostileCase(
            "absolute member", [("cd.zip", zip_of([("/tmp/x.dcm", image)]), ZIP)], "leaves the archive root"
        ),
        HostileCase("truncated zip", [("cd.zip", truncated_zip, ZIP)], "truncated"),
        HostileCase(
            "dicomdir escapes",
            [
                (
                    "cd.zip",
                    zip_of([("DICOMDIR", dicomdir_pointing_to("..", "..", "ETC", "PASSWD")), ("IM1", image)]),
                    ZIP,
                )
            ],
            "leaves the upload root",
        ),
        HostileCase(
            "dicomdir lists absent files",
            [("cd.zip", zip_of([("DICOMDIR", dicomdir_pointing_to("IMAGES", "IM9")), ("IM1", image)]), ZIP)],
            "not in the upload",
        ),
        HostileCase(
            "two values in a UID",
            [("a.dcm", with_uid("SOPInstanceUID", b"1.2.3\\4.5"), "application/dicom")],
            "without a valid SOPInstanceUID (a UID is digits and dots",
        ),
        HostileCase(
            "letters in a UID",
            [("a.dcm", with_uid("StudyInstanceUID", b"1.2.840.ABC"), "application/dicom")],
            "without a valid StudyInstanceUID (a UID is digits and dots",
        ),
        HostileCase(
            "a slash in a UID",
            [("cd.zip", zip_of([("IM1", with_uid("SeriesInstanceUID", b"1.2/../3"))]), ZIP)],
            "without a valid SeriesInstanceUID (a UID is digits and dots",
        ),
        HostileCase(
            "a UID ending in a dot",
            [("a.dcm", with_uid("SOPInstanceUID", b"1.2.3."), "application/dicom")],
            "without a valid SOPInstanceUID (a UID is digits and dots",
        ),
        HostileCase(
            "rows and columns beyond the pixel data",
            [("a.dcm", pixel_data_short_of(128, 64), "application/dicom")],
            "holds less pixel data than its Rows, Columns",
        ),
        HostileCase(
            "a huge private element",
            [("a.dcm", huge_private_element(2 * 1024 * 1024), "application/dicom")],
            "before its pixel data (private elements or an encapsulated document), more than the 1 MiB one",
        ),
        HostileCase(
            "folder path escapes",
            [("../../outside.dcm", image, "application/dicom")],
            "leaves the upload root",
        ),
    ]
