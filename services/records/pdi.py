"""IHE PDI: a DICOMDIR says which files of a CD are the study; its paths must stay inside the upload."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

import pydicom

from services.common.errors import RecordsRejected
from services.records.archive import Entry, safe_relative_path

DICOMDIR_NAME = "DICOMDIR"
# What some CD readers and copy tools leave on an ISO 9660 name: the version (";1") and the dot of an
# empty extension ("IM00001." / "IM00001.;1"); a DICOMDIR's file IDs carry neither.
_ISO9660_TAIL = re.compile(r"\.?(;\d*)?$")


def media_key(relative_path: str) -> str:
    """A path as a DICOMDIR's file IDs name it: upper case, without ISO 9660 version or empty extension."""
    return "/".join(_ISO9660_TAIL.sub("", part) for part in relative_path.upper().split("/"))


def is_dicomdir_name(relative_path: str | None) -> bool:
    return relative_path is not None and PurePosixPath(media_key(relative_path)).name == DICOMDIR_NAME


def media_roots(entries: Sequence[Entry]) -> list[PurePosixPath]:
    """The folders of a folder upload that hold a DICOMDIR: what else is in them came on the CD (viewer,
    autorun, readme), as it does in a ZIP of the CD. Loose files sent beside a loose DICOMDIR are not."""
    roots = [
        PurePosixPath(media_key(e.relative_path)).parent
        for e in entries
        if not e.from_archive and e.relative_path is not None and is_dicomdir_name(e.relative_path)
    ]
    return [root for root in roots if root.parts]


def on_media(entry: Entry, roots: Sequence[PurePosixPath]) -> bool:
    if entry.relative_path is None:
        return False
    path = PurePosixPath(media_key(entry.relative_path))
    return any(root in path.parents for root in roots)


def referenced_paths(entry: Entry, max_bytes: int) -> list[str]:
    """The files a DICOMDIR lists, as paths relative to the upload root (upper-cased, as on a CD)."""
    refuse = f"{entry.label} is a DICOMDIR that"
    if entry.received.size_bytes > max_bytes:
        raise RecordsRejected(f"{refuse} is implausibly large; nothing from this upload was stored")
    try:
        dicomdir = pydicom.dcmread(entry.received.path, stop_before_pixels=True)
        records = list(dicomdir.get("DirectoryRecordSequence") or [])
        file_ids = [r.get("ReferencedFileID") for r in records if r.get("ReferencedFileID") is not None]
    except Exception:
        raise RecordsRejected(
            f"{refuse} cannot be read (it is truncated or corrupt); nothing from this upload was stored"
        ) from None
    base = PurePosixPath(entry.relative_path or DICOMDIR_NAME).parent
    paths = []
    for file_id in file_ids:
        components = [str(file_id)] if isinstance(file_id, str) else [str(c) for c in file_id]
        joined = "/".join([*base.parts, *components])
        relative = safe_relative_path(joined)
        if relative is None or any(c in ("", ".", "..") or "/" in c or "\\" in c for c in components):
            raise RecordsRejected(
                f"{refuse} lists a file whose path leaves the upload root; nothing from this upload was stored"
            )
        paths.append(relative.upper())
    return paths


def select_listed(entries: Sequence[Entry], max_dicomdir_bytes: int) -> tuple[list[Entry], list[Entry]]:
    """With a DICOMDIR: (the entries it lists, the rest); without one: (all entries, [])."""
    dicomdirs = [e for e in entries if is_dicomdir_name(e.relative_path)]
    if not dicomdirs:
        return list(entries), []
    wanted: set[str] = set()
    for dicomdir in dicomdirs:
        wanted.update(referenced_paths(dicomdir, max_dicomdir_bytes))
    by_path = {media_key(e.relative_path): e for e in entries if e.relative_path is not None}
    absent = sorted(wanted - by_path.keys())
    if absent:
        raise RecordsRejected(
            f"the DICOMDIR lists {len(absent)} file(s) that are not in the upload; "
            "upload the whole CD (every folder, and the files themselves: a symbolic link in a ZIP is left out); "
            "nothing from this upload was stored"
        )
    listed = [e for e in entries if e.relative_path is not None and media_key(e.relative_path) in wanted]
    rest = [e for e in entries if e not in listed and e not in dicomdirs]
    return listed, rest
