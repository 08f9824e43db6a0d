"""The content-addressed file store: uploads stream into `tmp/`, kept files live at `objects/<sha[:2]>/<sha>`."""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.common.config import Settings

CHUNK_BYTES = 1024 * 1024
HEAD_BYTES = 132  # a DICOM file's 128-byte preamble and its "DICM" prefix


class FileTooLarge(Exception):
    def __init__(self, position: int, total: int, limit: int) -> None:
        super().__init__(
            f"file {position} of {total} is larger than the {human_size(limit)} limit; "
            "nothing from this upload was stored"
        )


@dataclass(frozen=True)
class ReceivedFile:
    """An uploaded file in the temp area, with what streaming it taught us."""

    position: int
    path: Path
    sha256: str
    size_bytes: int
    head: bytes
    utf8_text: bool


@dataclass(frozen=True)
class ObjectStore:
    root: Path

    @classmethod
    def for_settings(cls, settings: Settings) -> ObjectStore:
        return cls(settings.data_dir / "records")

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def receive(self, source: BinaryIO, *, position: int, total: int, limit: int) -> ReceivedFile:
        """Copy `source` into a temp file in chunks, hashing it and refusing it past `limit` bytes."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".part")
        path = Path(name)
        digest = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")()
        size, head, text = 0, b"", True
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > limit:
                        raise FileTooLarge(position, total, limit)
                    digest.update(chunk)
                    out.write(chunk)
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    text = text and _still_text(decoder, chunk)
                text = text and _still_text(decoder, b"", final=True)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return ReceivedFile(position, path, digest.hexdigest(), size, head, text)

    def keep(self, received: ReceivedFile) -> str:
        """Move a received file into the store; returns its path relative to the store root."""
        relative = f"objects/{received.sha256[:2]}/{received.sha256}"
        target = self.path(relative)
        if target.exists():
            self.discard(received)
            return relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(received.path, target)
        _fsync_dir(target.parent)
        return relative

    def discard(self, received: ReceivedFile) -> None:
        received.path.unlink(missing_ok=True)


def _still_text(decoder: codecs.IncrementalDecoder, chunk: bytes, final: bool = False) -> bool:
    if b"\x00" in chunk:
        return False
    try:
        decoder.decode(chunk, final)
    except UnicodeDecodeError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"
