"""A CD's contents sent as one ZIP: expanded member by member into the store's temp area, within limits.

Refused (typed, nothing kept): not a readable ZIP, too many members, a member path that leaves the
archive root, declared or actual size beyond the total, a compression ratio that only a bomb has,
an encrypted member, an archive inside the archive.

Left out, the rest imported, and said in the upload's answer (`warnings`, by position, never by path: a
path may name the patient): an entry that is not a regular file by its external attributes, such as a
symbolic link (its data is the path it points to, never followed), a device file, a named pipe or a socket,
and a folder entry that holds data. An empty folder entry is simply not a file. ZIP has no hard links:
an archiver stores each linked name as a copy, which is imported like any file.
"""

from __future__ import annotations

import stat
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


MSDOS_DIRECTORY = 0x10  # the low byte of the external attributes: MS-DOS attributes
NOT_A_FILE = {
    stat.S_IFLNK: "is a symbolic link (its data is the path it points to, never followed)",
    stat.S_IFCHR: "is a device file",
    stat.S_IFBLK: "is a device file",
    stat.S_IFIFO: "is a named pipe",
    stat.S_IFSOCK: "is a socket",
}


def not_a_file(name: str, external_attr: int, size: int) -> str | None:
    """Why an archive entry is not a regular file to import (what it is), or None for a file. An empty
    folder entry is "" (nothing to import, nothing to say). The upper 16 bits of the external attributes
    are the Unix mode where the archiver recorded one (Info-ZIP, macOS, Python, 7-Zip), else 0."""
    kind = stat.S_IFMT(external_attr >> 16)
    if kind in NOT_A_FILE:
        return NOT_A_FILE[kind]
    if name.endswith("/") or kind == stat.S_IFDIR or external_attr & MSDOS_DIRECTORY:
        return f"is a folder entry holding {size} bytes" if size else ""
    return None


def left_out_note(label: str, what: str) -> str:
    """What the upload's answer says of an entry left out: its position and what it is, never its path."""
    return (
        f"{label} {what}: left out, the rest of the upload was imported; add the file itself if it is needed"
    )


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
    left_out: list[str] | None = None,
) -> list[Entry]:
    """Stream every member of `archive` (a file, or a seekable stream such as the upload's own spool file,
    which saves copying the archive once) into the temp area; on any refusal the caller discards all.
    Entries that are not regular files are not read: why each was left out is added to `left_out`."""
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
            # Empty folder entries are no member; every other entry is numbered, imported or not.
            members = [m for m in zf.infolist() if _what(m) != ""]
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
                what = _what(member)
                if what:
                    if left_out is not None:
                        left_out.append(left_out_note(label, what))
                    continue
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


def _what(member: zipfile.ZipInfo) -> str | None:
    return not_a_file(member.filename, member.external_attr, member.file_size)


def _discard(store: ObjectStore, entries: list[Entry]) -> None:
    for entry in entries:
        store.discard(entry.received)
