"""A CD's contents sent as one ZIP: expanded member by member into the store's temp area, within limits.

Refused (typed, nothing kept): not a readable ZIP, too many members, a member path that leaves the
archive root, declared or actual size beyond the total, a compression ratio that only a bomb has,
an encrypted member, an archive inside the archive.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from services.common.errors import RecordsRejected, human_size
from services.records.limits import ImportLimits
from services.records.store import FileTooLarge, ObjectStore, ReceivedFile

if TYPE_CHECKING:
    from services.records.classify import DicomHeader

ZIP_MAGIC = b"PK\x03\x04"
ARCHIVE_MAGICS = (ZIP_MAGIC, b"PK\x05\x06", b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!", b"BZh")
# Below this size a high ratio is harmless (a blank image compresses a thousandfold).
RATIO_CHECK_FROM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One file of an upload, with its path relative to the upload root when the uploader sent one."""

    received: ReceivedFile
    relative_path: str | None
    label: str
    from_archive: bool = False
    declared_type: str | None = None  # what the client said it is (declared DICOM must be DICOM)
    header: DicomHeader | None = None  # read already as it arrived (a retrieved instance): not read again


def is_zip_head(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06")


def is_archive_head(head: bytes) -> bool:
    """ZIP, gzip, 7-Zip, RAR or bzip2 by their first bytes."""
    return any(head.startswith(magic) for magic in ARCHIVE_MAGICS)


def safe_relative_path(name: str) -> str | None:
    """The member path normalized to POSIX, or None if it is absolute or climbs out of the root."""
    cleaned = name.replace("\\", "/")
    path = PurePosixPath(cleaned)
    if cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":"):
        return None
    if any(part == ".." for part in path.parts):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return "/".join(parts) if parts else None


def expand_zip(
    archive: Path | IO[bytes],
    *,
    position: int,
    total: int,
    store: ObjectStore,
    limits: ImportLimits,
    upload_limit: int,
) -> list[Entry]:
    """Stream every member of `archive` (a file, or a seekable stream such as the upload's own spool file,
    which saves copying the archive once) into the temp area; on any refusal the caller discards all."""
    where = f"file {position} of {total}"

    def refuse(problem: str) -> RecordsRejected:
        return RecordsRejected(
            f"{where} is a ZIP archive that {problem}; nothing from this upload was stored"
        )

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise refuse("cannot be read (it is truncated or corrupt); create the ZIP again") from None
    entries: list[Entry] = []
    try:
        with zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > limits.max_archive_members:
                raise refuse(
                    f"has {len(members)} files, more than the {limits.max_archive_members} one upload may hold"
                )
            declared = sum(m.file_size for m in members)
            if declared > limits.max_archive_total_bytes:
                raise refuse(
                    f"expands to {human_size(declared)}, more than the "
                    f"{human_size(limits.max_archive_total_bytes)} one upload may hold"
                )
            expanded = 0
            for index, member in enumerate(members, start=1):
                label = f"member {index} of {len(members)} of {where}"
                relative = safe_relative_path(member.filename)
                if relative is None:
                    raise refuse(
                        f"has a member ({index} of {len(members)}) whose path leaves the archive root"
                    )
                if member.flag_bits & 0x1:
                    raise refuse("is password-protected; upload an unencrypted archive")
                if (
                    member.file_size > RATIO_CHECK_FROM_BYTES
                    and member.file_size > limits.max_compression_ratio * max(member.compress_size, 1)
                ):
                    raise refuse(
                        f"has a member ({index} of {len(members)}) compressed more than "
                        f"{limits.max_compression_ratio}:1, as only a ZIP bomb is"
                    )
                remaining = limits.max_archive_total_bytes - expanded
                with zf.open(member) as stream:
                    received = store.receive(
                        stream, position=position, total=total, limit=min(upload_limit, remaining)
                    )
                entries.append(Entry(received, relative, label, from_archive=True))
                expanded += received.size_bytes
                if is_archive_head(received.head):
                    raise refuse(
                        f"holds another archive (member {index} of {len(members)}); upload the files themselves"
                    )
    except FileTooLarge:
        _discard(store, entries)
        raise refuse(
            f"expands beyond {human_size(min(upload_limit, limits.max_archive_total_bytes))}, "
            "more than one upload may hold"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError):
        _discard(store, entries)
        raise refuse("cannot be read (it is truncated, corrupt or uses an unsupported compression)") from None
    except BaseException:
        _discard(store, entries)
        raise
    return entries


def _discard(store: ObjectStore, entries: list[Entry]) -> None:
    for entry in entries:
        store.discard(entry.received)
