"""De-identified export for teaching and QA: DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile (method code 113100 recorded in each instance), no options retained.

The profile's attribute table (PS3.15 Table E.1-1, edition 2026c: some 650 attributes, each with its action)
is read as data from `dicom-anonymizer` (KitwareMedical, BSD-3-Clause), the one package of the field that
carries the whole table per edition and follows the standard's releases. Its engine is not used: it applies
the table to the top level only (not inside sequences), draws UIDs from one process-wide random map and
writes a date where the table says remove. `deid` (pydicom, MIT) and `dicognito` (MIT) carry heuristics of
their own (keyword patterns, shifted dates), not the table. Here each action is applied per tag at every
nesting level (a sequence the table does not name is kept and its items are cleaned the same way):

    X  removed                 Z  zero length             D  a dummy value of the VR
    U  a replacement UID, the same for the same original within one export (salted, cannot be linked back)
    Z/D, X/Z        Z (always valid: Type 2 stays present, a Type 3 may be empty)
    X/D, X/Z/D      X, or D for those Type 1 in an ultrasound IOD (Enhanced US Volume)
    X/Z/U*          the sequence is kept, its items cleaned (their instance UIDs replaced)

Beyond the table: private attributes, curves and overlays (groups 50xx, 60xx: text drawn over the image) go,
at any depth (inside a sequence the table says to dummy too: the profile retains no private attributes),
and so do the issuer sequences that qualify Patient ID and Accession Number (Issuer of Patient ID Qualifiers
Sequence, Issuer of Accession Number Sequence): the table removes Issuer of Patient ID and zeroes the
identifiers they qualify, but names neither sequence, whose items name the issuing facility. A dummy stands
where the export's DICOMDIR needs a Type 1 value (PS3.3 F.5). Pixel data is copied as bytes unless cleaned
(below); anything after it (digital signatures, trailing padding, private groups; all X) is left out.

Burned-in text (Burned In Annotation not "NO": most ultrasound, whose scanner writes the patient's name and
the date at the top of the frame): the Clean Pixel Data Option (PS3.15 E.3.1, code 113101) blanks every
pixel outside the bounding boxes of the Sequence of Ultrasound Regions, frame by frame as the clip streams,
for pixels of 8 or 16 bits, unsigned, MONOCHROME1/2 or colour; only then is Burned In Annotation set to NO.
Native (uncompressed, little endian) frames are read and cleaned one at a time. Compressed ones (JPEG Baseline
and Extended, JPEG Lossless, JPEG-LS, JPEG 2000, RLE: what carts and PACS send) are decoded one frame at a
time by pydicom's decoder plugins as rendering.py orders them (GDCM last), cleaned, and written as Explicit
VR Little Endian native frames, the attributes saying so: Transfer Syntax UID; Photometric Interpretation RGB
with Planar Configuration 0 for colour (YBR_FULL/YBR_FULL_422 JPEG decodes to RGB, YBR_ICT/YBR_RCT too);
Bits Allocated, Stored and High Bit as decoded; Lossy Image Compression "01" with its Method and Ratio when
the source syntax is lossy (PS3.3 C.7.6.1.1.5: once lossy, always flagged; Method named from the syntax and
Ratio from the stored size where the source gave none). The decoded size (frames x rows x columns x samples
x bytes) is bounded by `DeidentifyLimits` (RECORDS_DEIDENTIFY_MAX_DECODED_BYTES). Anything else that may
carry text is withheld (`Withheld` says why): a document, a video clip (MPEG-2, MPEG-4, HEVC: its frames
are not decoded), a syntax no decoder here reads, pixel data that does not decode, no ultrasound regions, a
layout the cleaning does not handle, native pixel data that is not its frames, or a decoded size over the
limit.
"""

from __future__ import annotations

import enum
import io
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.pixels
import pydicom.uid
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records.rendering import VIDEO_SYNTAXES, decodable  # importing it puts GDCM last
from services.records.rewrite import PIXEL_DATA_TAG, explicit_pixel_data_end, rewritten_chunks

BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "DCM", "Clean Pixel Data Option")
CLEAN_PIXEL_DATA_METHOD = "PS3.15 E.3.1 Clean Pixel Data: outside US regions blanked"  # LO
TABLE_EDITION = "2026c"
METHOD = f"DICOM PS3.15 E.1 Basic Profile, Table E.1-1 of {TABLE_EDITION}"  # LO: 64 characters at most

_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _profile_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """Table E.1-1's Basic Profile column: actions by tag, and by (group, element, group mask, element
    mask) for the repeating groups (curves, overlay data and comments)."""
    database = dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}")
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORIES.items():
        for tag in database[category]:
            if len(tag) == 4:
                masked.append((*tag, action))
            else:
                actions[(tag[0] << 16) | tag[1]] = action
    return actions, masked


ACTIONS, MASKED_ACTIONS = _profile_table()
# Not rows of the table; they qualify identifiers the table zeroes (Patient ID, Accession Number) and name
# the facility that issued them, as Issuer of Patient ID (X) does.
ACTIONS[tag_for_keyword("IssuerOfPatientIDQualifiersSequence")] = "X"  # type: ignore[index]
ACTIONS[tag_for_keyword("IssuerOfAccessionNumberSequence")] = "X"  # type: ignore[index]

# Type 1 in an ultrasound IOD (Enhanced US Volume: Enhanced General Equipment, Enhanced US Image), so an
# X/D or X/Z/D of these gets a dummy, and so do Z/D and Z where the DICOMDIR's records need a value.
DUMMIES = {
    "PatientID": "DEIDENTIFIED",
    "StudyID": "1",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "ContentDate": "19000101",
    "ContentTime": "000000",
    "AcquisitionDateTime": "19000101000000",
    "DeviceSerialNumber": "DEIDENTIFIED",
}
_DUMMY_TAGS = {int(tag_for_keyword(keyword)): value for keyword, value in DUMMIES.items()}  # type: ignore[arg-type]
# Z makes these empty; they are Type 1 in the export's DICOMDIR, so the instance carries the same dummy.
_DICOMDIR_TYPE_1 = ("PatientID", "StudyID", "StudyDate", "StudyTime")

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "urn:deidentified",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
}


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
    """Whether the pixels are declared free of burned-in text (exported as they are)."""
    return (burned_in_annotation or "").upper() == "NO"


class DeidentifyLimits(BaseSettings):
    """`RECORDS_DEIDENTIFY_*`: how much a compressed instance may decode to in the de-identified export."""

    model_config = SettingsConfigDict(env_prefix="RECORDS_DEIDENTIFY_", extra="ignore")

    # Frames x Rows x Columns x Samples x Bits Allocated / 8 once decoded: what the export writes for it (one
    # frame at a time in memory; the whole into the ZIP on disk, or down the WADO-URI response).
    max_decoded_bytes: int = 2 * 1024**3


@lru_cache
def get_deidentify_limits() -> DeidentifyLimits:
    return DeidentifyLimits()


class Withheld(enum.StrEnum):
    """Why an instance that may carry burned-in text is left out of the export (its text: `.reason`)."""

    DOCUMENT = "document"
    VIDEO = "video"
    COMPRESSED = "compressed"
    NOT_DECODED = "pixel_data_not_decoded"
    TOO_LARGE = "decoded_too_large"
    NO_REGIONS = "no_ultrasound_regions"
    UNSUPPORTED_PIXELS = "unsupported_pixel_layout"
    PIXEL_DATA_NOT_NATIVE = "pixel_data_not_native"

    @property
    def reason(self) -> str:
        return {
            "document": "a document, not an image (a report, a structured report): its text is not de-identified",
            "video": "burned-in annotation not ruled out and the instance is a video clip (MPEG-2, MPEG-4 or "
            "HEVC): its frames are not decoded to be cleaned",
            "compressed": "burned-in annotation not ruled out and the pixel data is compressed in a transfer "
            "syntax no decoder here reads (JPEG Baseline, Extended and Lossless, JPEG-LS, JPEG 2000 and RLE "
            "are decoded and cleaned): it cannot be cleaned",
            "pixel_data_not_decoded": "burned-in annotation not ruled out and the compressed pixel data could "
            "not be decoded here (a corrupt or truncated frame, or a variant no decoder here reads, such as "
            "12-bit JPEG Extended): it cannot be cleaned",
            "decoded_too_large": "burned-in annotation not ruled out and the compressed pixel data, decoded to "
            "be cleaned, would be larger than RECORDS_DEIDENTIFY_MAX_DECODED_BYTES allows (2 GiB unless set): "
            "raise that setting to export such instances",
            "no_ultrasound_regions": "burned-in annotation not ruled out and no Sequence of Ultrasound Regions "
            "says where the image is, so nothing tells the text from the image",
            "unsupported_pixel_layout": "burned-in annotation not ruled out and the pixel layout (photometric "
            "interpretation, bits allocated, signed pixels or byte order) is not one the cleaning handles",
            "pixel_data_not_native": "burned-in annotation not ruled out and the Pixel Data is not the "
            "uncompressed frames its transfer syntax says (encapsulated in fragments, or a length other than "
            "its rows, columns and frames need): it cannot be cleaned frame by frame",
        }[self.value]


UNDEFINED_LENGTH = 0xFFFFFFFF
CLEANABLE_SYNTAXES = {
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
}


@dataclass(frozen=True)
class PixelCleaning:
    """The Clean Pixel Data Option for one instance: a frame's pixels outside the ultrasound regions blanked."""

    frame_bytes: int
    shape: tuple[int, ...]
    dtype: str
    outside: npt.NDArray[np.bool_]
    planar: bool
    blank: int
    # Compressed pixel data: decoded frame by frame from `source` (`frames` of them) and written native, with
    # these attributes set (by keyword; None removes one).
    source: Path | None = None
    frames: int = 1
    decoded_attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def decodes(self) -> bool:
        return self.source is not None

    def __call__(self, frame: bytes) -> bytes:
        return self.blanked(np.frombuffer(frame, dtype=self.dtype).reshape(self.shape).copy()).tobytes()

    def blanked(self, pixels: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """`pixels` (one frame, writable, in `shape`) with everything outside the regions blanked, in place."""
        if self.planar:
            pixels[:, self.outside] = self.blank
        else:
            pixels[self.outside] = self.blank
        return pixels


def pixel_cleaning(
    header: Dataset,
    pixel_length: int | None,
    source: Path | None = None,
    limits: DeidentifyLimits | None = None,
) -> PixelCleaning | Withheld:
    """How the pixels of an instance that may carry burned-in text are cleaned, or why it is withheld;
    `pixel_length` is its Pixel Data's value length as the file declares it (`pixel_data_length`); `source`,
    the file, is decoded (its first frame, to see what it decodes to) when its pixel data is compressed."""
    if "Rows" not in header:  # no pixels: a report or an SR, whose text the profile does not clean
        return Withheld.DOCUMENT
    syntax = pydicom.uid.UID(
        str(header.file_meta.get("TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian)
    )
    compressed = syntax not in CLEANABLE_SYNTAXES
    if compressed and syntax in VIDEO_SYNTAXES:
        return Withheld.VIDEO
    if compressed and (source is None or not decodable(syntax)):
        return Withheld.COMPRESSED
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    boxes = [
        [region.get(f"RegionLocation{corner}") for corner in ("MinX0", "MinY0", "MaxX1", "MaxY1")]
        for region in header.get("SequenceOfUltrasoundRegions") or []
    ]
    if not boxes or not rows or not columns or any(value is None for box in boxes for value in box):
        return Withheld.NO_REGIONS
    photometric = str(header.get("PhotometricInterpretation", ""))
    samples, bits = int(header.get("SamplesPerPixel") or 1), int(header.get("BitsAllocated") or 0)
    frames = int(header.get("NumberOfFrames") or 1)
    layouts = COLOUR_DECODED if compressed else (("RGB", 3),)
    if (
        bits not in (8, 16)
        or int(header.get("PixelRepresentation") or 0) != 0
        or (photometric, samples) not in (("MONOCHROME1", 1), ("MONOCHROME2", 1), *layouts)
    ):
        return Withheld.UNSUPPORTED_PIXELS
    outside = np.ones((rows, columns), dtype=bool)
    for min_x, min_y, max_x, max_y in boxes:
        outside[int(min_y) : int(max_y) + 1, int(min_x) : int(max_x) + 1] = False
    stored = int(header.get("BitsStored") or bits)
    blank = (1 << stored) - 1 if photometric == "MONOCHROME1" else 0  # black either way
    if compressed:
        assert source is not None
        return _decoded_cleaning(header, source, syntax, outside, blank, limits or get_deidentify_limits())
    planar = samples > 1 and int(header.get("PlanarConfiguration") or 0) == 1
    shape = (
        (samples, rows, columns) if planar else (rows, columns, samples) if samples > 1 else (rows, columns)
    )
    frame_bytes = rows * columns * samples * bits // 8
    native = frame_bytes * frames
    if pixel_length not in (native, native + native % 2):  # frames cut short or shifted: some left uncleaned
        return Withheld.PIXEL_DATA_NOT_NATIVE
    return PixelCleaning(
        frame_bytes=frame_bytes,
        shape=shape,
        dtype="u1" if bits == 8 else "<u2",
        outside=outside,
        planar=planar,
        blank=blank,
    )


# What a colour JPEG, JPEG-LS, JPEG 2000 or RLE frame may say it holds; pydicom decodes each to RGB.
COLOUR_DECODED = tuple(
    (photometric, 3) for photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
)
LOSSY_METHODS = {
    pydicom.uid.JPEGBaseline8Bit: "ISO_10918_1",
    pydicom.uid.JPEGExtended12Bit: "ISO_10918_1",
    pydicom.uid.JPEGLSNearLossless: "ISO_14495_1",
    pydicom.uid.JPEG2000: "ISO_15444_1",
}


def _decoded_cleaning(
    header: Dataset,
    source: Path,
    syntax: pydicom.uid.UID,
    outside: npt.NDArray[np.bool_],
    blank: int,
    limits: DeidentifyLimits,
) -> PixelCleaning | Withheld:
    """The cleaning of compressed pixel data, from what its first frame decodes to."""
    rows, columns = int(header.Rows), int(header.Columns)
    samples, frames = int(header.get("SamplesPerPixel") or 1), int(header.get("NumberOfFrames") or 1)
    if frames * rows * columns * samples * int(header.BitsAllocated) // 8 > limits.max_decoded_bytes:
        return Withheld.TOO_LARGE
    try:
        first = pydicom.pixels.pixel_array(str(source), index=0)
    except Exception:  # a decoder's own error types differ per plugin
        return Withheld.NOT_DECODED
    shape = (rows, columns, samples) if samples > 1 else (rows, columns)
    if first.shape != shape or first.dtype not in (np.uint8, np.uint16):
        return Withheld.UNSUPPORTED_PIXELS
    bits = first.dtype.itemsize * 8
    stored = min(int(header.get("BitsStored") or bits), bits)
    attributes: dict[str, Any] = {
        "PhotometricInterpretation": "RGB" if samples > 1 else str(header.PhotometricInterpretation),
        "PlanarConfiguration": 0 if samples > 1 else None,
        "BitsAllocated": bits,
        "BitsStored": stored,
        "HighBit": stored - 1,
    }
    if syntax in LOSSY_METHODS or header.get("LossyImageCompression") == "01":
        attributes["LossyImageCompression"] = "01"
        if syntax in LOSSY_METHODS and not header.get("LossyImageCompressionMethod"):
            attributes["LossyImageCompressionMethod"] = LOSSY_METHODS[syntax]
        if syntax in LOSSY_METHODS and not header.get("LossyImageCompressionRatio"):
            attributes["LossyImageCompressionRatio"] = _compression_ratio(source, frames * first.nbytes)
    return PixelCleaning(
        frame_bytes=first.nbytes,
        shape=shape,
        dtype="u1" if bits == 8 else "<u2",
        outside=outside,
        planar=False,
        blank=blank,
        source=source,
        frames=frames,
        decoded_attributes=attributes,
    )


def _compression_ratio(source: Path, decoded_bytes: int) -> str:
    """Decoded size over the encapsulated Pixel Data's, as a DS (PS3.3 C.7.6.1.1.5.2)."""
    with source.open("rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        offset = fp.tell()
        size = fp.seek(0, io.SEEK_END)
    end = explicit_pixel_data_end(source, offset, size)
    stored = end - offset if end > offset else size - offset
    return f"{decoded_bytes / max(stored, 1):.4g}"


def record_pixel_cleaning(dataset: Dataset, cleaning: PixelCleaning | None = None) -> None:
    """Say in the instance that its pixels were cleaned (after `deidentify`), and, where they were decoded
    to be, that they are native now (`cleaning.decoded_attributes`)."""
    if cleaning is not None and cleaning.decodes:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        for keyword, value in cleaning.decoded_attributes.items():
            if value is not None:
                setattr(dataset, keyword, value)
            elif keyword in dataset:
                delattr(dataset, keyword)
    dataset.BurnedInAnnotation = "NO"
    dataset.DeidentificationMethod = [METHOD, CLEAN_PIXEL_DATA_METHOD]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = CLEAN_PIXEL_DATA_CODE
    dataset.DeidentificationMethodCodeSequence.append(code)


def deidentified_header(source: Path, uids: UidMap) -> tuple[Dataset, int | None]:
    """The de-identified header of `source` (no pixel data) and its Pixel Data's declared value length."""
    with source.open("rb") as fp:
        dataset = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
    pixel_length = pixel_data_length(source, pixel_offset, dataset.file_meta.get("TransferSyntaxUID"))
    deidentify(dataset, uids)
    return dataset, pixel_length


def pixel_data_length(source: Path, offset: int, syntax: str | None) -> int | None:
    """The value length of the Pixel Data element at `offset` (where the header read stopped) as its own
    header declares it, but no more than the file holds: UNDEFINED_LENGTH when encapsulated in fragments,
    None when no native-looking Pixel Data element (OB or OW, little endian) stands there. Read from the
    element's 8 or 12 header bytes, except in a deflated file (read whole: such files are rare and small)."""
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        whole = pydicom.dcmread(source)
        if "PixelData" not in whole:
            return None
        element = whole["PixelData"]
        return UNDEFINED_LENGTH if element.is_undefined_length else len(element.value or b"")
    with source.open("rb") as fp:
        fp.seek(offset)
        head = fp.read(12)
        size = fp.seek(0, io.SEEK_END)
    if head[:4] != PIXEL_DATA_TAG:
        return None
    if syntax == pydicom.uid.ImplicitVRLittleEndian:
        length, value_at = int.from_bytes(head[4:8], "little"), offset + 8
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        length, value_at = int.from_bytes(head[8:12], "little"), offset + 12
    else:
        return None
    return length if length == UNDEFINED_LENGTH else min(length, size - value_at)


def deidentified_chunks(source: Path, uids: UidMap, cleaning: PixelCleaning | None = None) -> Iterator[bytes]:
    """The de-identified instance as chunks: header rewritten, pixel data copied as bytes (each frame
    cleaned, with `cleaning`) and nothing after it (Explicit VR Little Endian, as PS3.11's general purpose
    media profiles want, where the file was implicit or deflated)."""

    def edit(dataset: Dataset) -> None:
        deidentify(dataset, uids)
        if cleaning is not None:
            record_pixel_cleaning(dataset, cleaning)

    if cleaning is not None and cleaning.decodes:
        return _decoded_chunks(cleaning, edit)
    frames = (cleaning.frame_bytes, cleaning) if cleaning is not None else None
    return rewritten_chunks(source, edit, after_pixels=False, frames=frames)


def _decoded_chunks(cleaning: PixelCleaning, edit: Callable[[Dataset], None]) -> Iterator[bytes]:
    """A compressed instance written as Explicit VR Little Endian: its header, then its frames decoded one
    at a time (pydicom reads each alone from the file), each cleaned; nothing after the Pixel Data."""
    assert cleaning.source is not None
    dataset = pydicom.dcmread(cleaning.source, stop_before_pixels=True)
    edit(dataset)
    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    length = cleaning.frame_bytes * cleaning.frames
    vr = b"OB" if cleaning.dtype == "u1" else b"OW"
    yield header.getvalue() + PIXEL_DATA_TAG + vr + b"\x00\x00" + (length + length % 2).to_bytes(4, "little")
    count = 0
    for array in pydicom.pixels.iter_pixels(str(cleaning.source)):
        if count == cleaning.frames or array.shape != cleaning.shape:
            raise ValueError(
                "a decoded frame is not the size its first frame was; the instance was not written"
            )
        count += 1
        # A decoder's array may be shared or read-only: one owned copy in the written dtype, blanked in place.
        yield cleaning.blanked(np.array(array, dtype=cleaning.dtype)).tobytes()
    if count != cleaning.frames:
        raise ValueError(f"{count} of {cleaning.frames} frames decoded; the instance was not written")
    if length % 2:
        yield b"\x00"


def deidentify(dataset: Dataset, uids: UidMap) -> None:
    _clean(dataset, uids)
    for tag in [element.tag for element in dataset if element.tag.group > 0x7FE0]:
        del dataset[tag]  # after the pixel data: signatures, padding (X); left out of the bytes too
    sop_class = dataset.file_meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        # Inflated: no general purpose media profile (PS3.11) has Deflate, and media readers (dciodvfy among
        # them) do not read it. The file is read whole (rewrite.py), so it is written whole in this syntax.
        syntax = pydicom.uid.ExplicitVRLittleEndian
    meta = FileMetaDataset()  # no source, sending or receiving AE titles, no private information
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if syntax:
        meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.UID(IMPLEMENTATION_CLASS_UID)  # we wrote it, not the source's
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    dataset.file_meta = meta
    if getattr(dataset, "preamble", None):
        dataset.preamble = b"\x00" * 128  # an application's own 128 bytes (PS3.10 7.1) go too
    for keyword in _DICOMDIR_TYPE_1:
        if not dataset.get(keyword):
            setattr(dataset, keyword, DUMMIES[keyword])
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = Sequence([code])


def action_for(tag: BaseTag) -> str | None:
    """The Basic Profile's action for `tag`, None where the table names no action (kept)."""
    if _removed_everywhere(tag):
        return "X"
    action = ACTIONS.get(int(tag))
    if action is None:
        for group, element, group_mask, element_mask, masked in MASKED_ACTIONS:
            if tag.group & group_mask == group and tag.element & element_mask == element:
                return masked
    return action


def _removed_everywhere(tag: BaseTag) -> bool:
    """Private attributes; curves and overlays (any of their elements may carry text): X at any depth, in a
    sequence the table says to dummy too."""
    return bool(tag.is_private or 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF)


def _clean(dataset: Dataset, uids: UidMap) -> None:
    for element in list(dataset):
        action = action_for(element.tag)
        if action is None or action == "X/Z/U*":
            if element.VR == "SQ":
                for item in element.value or []:
                    _clean(item, uids)
            continue
        if action in ("X/D", "X/Z/D"):
            action = "D" if int(element.tag) in _DUMMY_TAGS else "X"
        elif action == "Z/D":
            action = "D" if int(element.tag) in _DUMMY_TAGS else "Z"
        elif action == "X/Z":
            action = "Z"
        if action == "X":
            del dataset[element.tag]
        elif action == "Z":
            _empty(element)
        elif action == "D":
            _dummy(element, uids, _DUMMY_TAGS.get(int(element.tag)))
        elif action == "U":
            _replace_uids(element, uids)


def _empty(element: DataElement) -> None:
    element.value = Sequence() if element.VR == "SQ" else None


def _dummy(element: DataElement, uids: UidMap, value: str | None = None) -> None:
    if element.VR == "SQ":  # a non-empty sequence: its items kept, every value in them replaced
        for item in element.value or []:
            for inner in list(item):
                if _removed_everywhere(inner.tag):
                    del item[inner.tag]  # "no private attributes retained": not even as a dummy
                else:
                    _dummy(inner, uids)
    elif element.VR == "UI":
        if not all(pydicom.uid.UID(str(uid)).name != str(uid) for uid in _values(element)):
            _replace_uids(element, uids)  # a UID the standard defines (a SOP class, a scheme) names no one
    elif value is not None:
        element.value = value
    elif element.VR in _TEXT_VRS:
        element.value = "DEIDENTIFIED"
    elif element.VR in _DUMMY_BY_VR:
        element.value = _DUMMY_BY_VR[element.VR]
    elif element.VR == "AT":
        return  # a tag names an attribute, never a person
    else:  # OB, OW, OD, OF, OL, OV, UN
        element.value = b"\x00\x00"


def _values(element: DataElement) -> list[Any]:
    return list(element.value) if element.VM > 1 else [element.value] if element.value else []


def _replace_uids(element: DataElement, uids: UidMap) -> None:
    if element.VR != "UI":
        _empty(element)
    elif not element.value:
        return
    elif element.VM > 1:
        element.value = [uids(str(uid)) for uid in element.value]
    else:
        element.value = uids(str(element.value))
