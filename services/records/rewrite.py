"""An instance handed out with its header rewritten and its pixel data copied as bytes.

Memory stays bounded by the header whatever the file's size. What goes out is Explicit VR Little Endian
where the file was Implicit VR Little Endian (PS3.18 8.7.3: not used with web services; PS3.11's general
purpose media profiles use Explicit VR too): the header is re-encoded and the Pixel Data element re-headed
in place. A deflated file, or an implicit one whose pixel data is not its last element, is read whole.
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


def rewritten_chunks(source: Path, edit: Callable[[Dataset], None]) -> Iterator[bytes]:
    """`source` after `edit` changed its header, as chunks."""
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
        pixel_header, pixel_offset = _explicit_pixel_header(source, pixel_offset, size)
        if pixel_offset < 0:
            dataset = pydicom.dcmread(source)
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    edit(dataset)
    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    yield header.getvalue() + pixel_header
    if pixel_offset < 0:
        return
    with source.open("rb") as fp:
        fp.seek(pixel_offset)
        while chunk := fp.read(CHUNK_BYTES):
            yield chunk


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
