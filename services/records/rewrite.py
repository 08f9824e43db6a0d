"""An instance handed out with its header rewritten and its pixel data copied as bytes.

Memory stays bounded by the header whatever the file's size. What goes out is Explicit VR Little Endian
where the file was Implicit VR Little Endian (PS3.18 8.7.3: not used with web services; PS3.11's general
purpose media profiles use Explicit VR too): the header is re-encoded and the Pixel Data element re-headed
in place. A deflated file, or an implicit one whose pixel data is not its last element, is read whole.
With `after_pixels=False` (the de-identified export) nothing after the Pixel Data element goes out: what may
follow it (digital signatures, trailing padding, private groups) is never copied unread.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pydicom.uid
from pydicom.dataset import Dataset

CHUNK_BYTES = 1024 * 1024
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER_TAG = b"\xfe\xff\xdd\xe0"


def rewritten_chunks(
    source: Path, edit: Callable[[Dataset], None], *, after_pixels: bool = True
) -> Iterator[bytes]:
    """`source` after `edit` changed its header, as chunks; without what follows its pixel data unless
    `after_pixels`."""
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
        end = _explicit_pixel_data_end(source, pixel_offset, size)
        if end < 0:
            dataset, pixel_offset = pydicom.dcmread(source), -1
    edit(dataset)
    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    yield header.getvalue() + pixel_header
    if pixel_offset < 0:
        return
    with source.open("rb") as fp:
        fp.seek(pixel_offset)
        left = end - pixel_offset
        while left > 0 and (chunk := fp.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk


def _explicit_pixel_data_end(source: Path, offset: int, size: int) -> int:
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
