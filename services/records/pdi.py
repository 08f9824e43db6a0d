"""IHE PDI: a DICOMDIR says which files of a CD are the study; its paths must stay inside the upload."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import pydicom

from services.common.errors import RecordsRejected
from services.records.archive import Entry, safe_relative_path

DICOMDIR_NAME = "DICOMDIR"


def is_dicomdir_name(relative_path: str | None) -> bool:
    return relative_path is not None and PurePosixPath(relative_path).name.upper() == DICOMDIR_NAME


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
    by_path = {e.relative_path.upper(): e for e in entries if e.relative_path is not None}
    absent = sorted(wanted - by_path.keys())
    if absent:
        raise RecordsRejected(
            f"the DICOMDIR lists {len(absent)} file(s) that are not in the upload; "
            "upload the whole CD (every folder); nothing from this upload was stored"
        )
    listed = [e for e in entries if e.relative_path is not None and e.relative_path.upper() in wanted]
    rest = [e for e in entries if e not in listed and e not in dicomdirs]
    return listed, rest
