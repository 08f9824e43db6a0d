"""The content-addressed file store: uploads stream into `tmp/`, kept files live at `objects/<sha[:2]>/<sha>`."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.common.config import Settings
from services.common.errors import human_size
from services.records.archive_store import (
    ARCHIVE_PREFIX,
    ArchiveUnavailable,
    DicomwebArchive,
    archive_for,
    get_storage_settings,
)

CHUNK_BYTES = 1024 * 1024
HEAD_BYTES = 132  # a DICOM file's 128-byte preamble and its "DICM" prefix
# SHA-256 releases the GIL on large buffers: a chunk this size or larger is hashed on another core while
# the next is read and this one written, so a large import costs about one pass of the hash, not two.
HASH_ASIDE_FROM_BYTES = 64 * 1024
_hashers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")
# Every this many bytes the kernel is asked to start writing the file out, so the fsync that makes it
# durable finds little left to do: the disk works while the next bytes arrive instead of after them.
WRITEBACK_EVERY_BYTES = 8 * 1024 * 1024


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


class IncomingFile:
    """A file being received: hashed, size-checked and sniffed (DICM prefix, UTF-8 text) as it streams."""

    def __init__(self, out: IO[bytes], path: Path, position: int, total: int, limit: int) -> None:
        self._out, self.path = out, path
        self._position, self._total, self._limit = position, total, limit
        self._digest = hashlib.sha256()
        self._hashing: Future[None] | None = None  # the previous chunk's hash, at most one at a time
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._size, self._head, self._text = 0, b"", True
        self._written_back = 0  # bytes handed to the kernel's writeback so far

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def head(self) -> bytes:
        """The first bytes written (up to HEAD_BYTES)."""
        return self._head

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            self.abort()
            raise FileTooLarge(self._position, self._total, self._limit)
        self._hash(chunk)
        self._out.write(chunk)
        if self._size - self._written_back >= WRITEBACK_EVERY_BYTES:
            self._start_writeback()
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._text = self._text and _still_text(self._decoder, chunk)

    def _start_writeback(self) -> None:
        """Start (not wait for) writing the bytes so far to disk: on Linux, POSIX_FADV_DONTNEED begins
        asynchronous writeback of dirty pages (and drops the clean ones: nothing rereads them soon)."""
        self._out.flush()
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            with contextlib.suppress(OSError):
                advise(self._out.fileno(), self._written_back, 0, os.POSIX_FADV_DONTNEED)
        self._written_back = self._size

    def _hash(self, chunk: bytes) -> None:
        self._hashed()
        if len(chunk) >= HASH_ASIDE_FROM_BYTES:
            # Hashed after this call returns: a caller's reusable buffer is copied first.
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
            self._hashing = _hashers.submit(self._digest.update, data)
        else:
            self._digest.update(chunk)

    def _hashed(self) -> None:
        if self._hashing is not None:
            hashing, self._hashing = self._hashing, None
            hashing.result()

    def finish(self) -> ReceivedFile:
        try:
            self._hashed()
            self._text = self._text and _still_text(self._decoder, b"", final=True)
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
        except BaseException:
            self.abort()
            raise
        return ReceivedFile(
            self._position, self.path, self._digest.hexdigest(), self._size, self._head, self._text
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._hashed()
        self._out.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ObjectStore:
    """Files on disk by default; with an archive configured, DICOM instances live in the archive and are
    read back through a local cache. Either way a file is stored completely before it is indexed."""

    root: Path
    archive: DicomwebArchive | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> ObjectStore:
        return cls(settings.data_dir / "records", archive_for(get_storage_settings()))

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def local_path(self, reference: str, sha256: str) -> Path:
        """A readable file for a stored reference (fetched from the archive on first use)."""
        if not reference.startswith(ARCHIVE_PREFIX):
            return self.path(reference)
        cached = self.cache_dir / sha256[:2] / sha256
        if not cached.exists():
            if self.archive is None:
                raise ArchiveUnavailable("this file is in the image archive, and no archive is configured")
            self.archive.fetch(reference, cached, sha256, self.root)
        return cached

    def keep_dicom(self, received: ReceivedFile, study: str, series: str, sop: str) -> str:
        """Keep a DICOM instance: in the archive when one is configured, else like any file."""
        if self.archive is None:
            return self.keep(received)
        reference = self.archive.store(received.path, study, series, sop)
        self.discard(received)
        return reference

    def remove(self, reference: str, sha256: str) -> None:
        if reference.startswith(ARCHIVE_PREFIX):
            # The archive keeps what it was sent (DICOMweb has no standard delete); only our cache goes.
            (self.cache_dir / sha256[:2] / sha256).unlink(missing_ok=True)
            return
        self.path(reference).unlink(missing_ok=True)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def receive(self, source: IO[bytes], *, position: int, total: int, limit: int) -> ReceivedFile:
        """Copy `source` into a temp file in chunks, hashing it and refusing it past `limit` bytes."""
        incoming = self.incoming(position=position, total=total, limit=limit)
        try:
            while chunk := source.read(CHUNK_BYTES):
                incoming.write(chunk)
        except BaseException:
            incoming.abort()
            raise
        return incoming.finish()

    def incoming(self, *, position: int, total: int, limit: int) -> IncomingFile:
        """A temp file to push chunks into (for bodies that arrive as events, e.g. a STOW-RS part)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".part")
        return IncomingFile(os.fdopen(fd, "wb"), Path(name), position, total, limit)

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
