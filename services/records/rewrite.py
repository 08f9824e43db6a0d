"""An instance handed out with its header rewritten and its pixel data copied as bytes.

Memory stays bounded by the header whatever the file's size. What goes out is Explicit VR Little Endian
where the file was Implicit VR Little Endian (PS3.18 8.7.3: not used with web services; PS3.11's general
purpose media profiles use Explicit VR too): the header is re-encoded and the Pixel Data element re-headed
in place. A deflated file, or an implicit one whose pixel data is not its last element, is read whole.
With `after_pixels=False` (the de-identified export) nothing after the Pixel Data element goes out: what may
follow it (digital signatures, trailing padding, private groups) is never copied unread. With `frames`, native
pixel data is read one frame at a time and each frame goes out as the cleaner returns it (the Clean Pixel Data
Option): one frame in memory, never the clip.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.uid
from pydicom.dataset import Dataset

CHUNK_BYTES = 1024 * 1024
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER_TAG = b"\xfe\xff\xdd\xe0"


FrameCleaner = Callable[[bytes], bytes]


def rewritten_chunks(
    source: Path,
    edit: Callable[[Dataset], None],
    *,
    after_pixels: bool = True,
    frames: tuple[int, FrameCleaner] | None = None,
) -> Iterator[bytes]:
    """`source` after `edit` changed its header, as chunks; without what follows its pixel data unless
    `after_pixels`; each native frame (of `frames[0]` bytes) passed through `frames[1]` when given."""
    with source.open("rb") as fp:
        dataset = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
        size = fp.seek(0, io.SEEK_END)
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    pixel_header = b""
    end = size
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        dataset = pydicom.dcmread(source)  # a deflated body cannot be spliced; such files are rare and small
        pixel_offset = -1
    elif syntax == pydicom.uid.ImplicitVRLittleEndian:
        pixel_header, pixel_offset = _explicit_pixel_header(source, pixel_offset, size)
        if pixel_offset < 0:
            dataset = pydicom.dcmread(source)
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    elif not after_pixels and pixel_offset < size:
        end = explicit_pixel_data_end(source, pixel_offset, size)
        if end < 0:
            dataset, pixel_offset = pydicom.dcmread(source), -1
    edit(dataset)
    if frames is not None and "PixelData" in dataset:  # read whole: cleaned in memory
        dataset.PixelData = b"".join(_cleaned_frames(dataset.PixelData, *frames))
    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    yield header.getvalue() + pixel_header
    if pixel_offset < 0:
        return
    with source.open("rb") as fp:
        if frames is None:
            yield from _copied(fp, pixel_offset, end)
            return
        value_start, value_end = _native_value(fp, pixel_offset, implicit=bool(pixel_header), size=size)
        yield from _copied(fp, pixel_offset, value_start)
        frame_bytes, clean = frames
        position = value_start
        while position + frame_bytes <= value_end:
            fp.seek(position)
            yield clean(fp.read(frame_bytes))
            position += frame_bytes
        yield from _copied(fp, position, end)


def _copied(fp: BinaryIO, start: int, stop: int) -> Iterator[bytes]:
    fp.seek(start)
    left = stop - start
    while left > 0 and (chunk := fp.read(min(CHUNK_BYTES, left))):
        left -= len(chunk)
        yield chunk


def _cleaned_frames(pixels: bytes, frame_bytes: int, clean: FrameCleaner) -> Iterator[bytes]:
    whole = len(pixels) - len(pixels) % frame_bytes
    for start in range(0, whole, frame_bytes):
        yield clean(pixels[start : start + frame_bytes])
    yield pixels[whole:]


def _native_value(fp: BinaryIO, offset: int, *, implicit: bool, size: int) -> tuple[int, int]:
    """Where the native Pixel Data value at `offset` starts and ends (implicit: `offset` is its value)."""
    if implicit:
        return offset, size
    fp.seek(offset)
    head = fp.read(12)
    length = int.from_bytes(head[8:12], "little")
    if head[:4] != PIXEL_DATA_TAG or head[4:6] not in (b"OB", b"OW") or length == 0xFFFFFFFF:
        raise ValueError("pixel data is not native Explicit VR Little Endian; it cannot be cleaned by frame")
    return offset + 12, min(offset + 12 + length, size)


def explicit_pixel_data_end(source: Path, offset: int, size: int) -> int:
    """Where the Explicit VR Little Endian Pixel Data element at `offset` ends (its items walked when
    encapsulated); -1 where it is something else (float pixel data, big endian, truncated): read it whole."""
    with source.open("rb") as fp:
        fp.seek(offset)
        head = fp.read(12)
        if len(head) < 12 or head[:4] != PIXEL_DATA_TAG or head[4:6] not in (b"OB", b"OW"):
            return -1
        length = int.from_bytes(head[8:12], "little")
        if length != 0xFFFFFFFF:
            end = offset + 12 + length
            return end if end <= size else -1
        position = offset + 12
        while position + 8 <= size:  # encapsulated: items up to the sequence delimiter
            fp.seek(position)
            item = fp.read(8)
            position += 8 + int.from_bytes(item[4:8], "little")
            if item[:4] == ITEM_TAG:
                continue
            return position if item[:4] == SEQUENCE_DELIMITER_TAG else -1
    return -1


def _explicit_pixel_header(source: Path, offset: int, size: int) -> tuple[bytes, int]:
    """For an Implicit VR Little Endian file whose native Pixel Data is its last element: that element's
    header in Explicit VR Little Endian and where its value starts; else (b"", -1) (read it whole)."""
    with source.open("rb") as fp:
        fp.seek(offset)
        head = fp.read(8)
    if not head:
        return b"", offset  # no pixel data: the header says it all
    if len(head) < 8 or head[:4] != PIXEL_DATA_TAG:
        return b"", -1
    length = int.from_bytes(head[4:8], "little")
    if length == 0xFFFFFFFF or offset + 8 + length != size:
        return b"", -1
    return head[:4] + b"OW\x00\x00" + head[4:8], offset + 8
