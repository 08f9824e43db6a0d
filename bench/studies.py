"""Synthetic ultrasound studies on disk for the benchmarks: cine clips of the demo patient, as a ZIP (a CD)
or as loose files (for a PACS)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pydicom.uid

from scripts import demo
from scripts.synthetic_study import make_us_instance

SIDE = 256
CLIP_FRAMES = 2048  # 2048 x 256 x 256 bytes = 128 MiB of pixel data per clip


def clips(directory: Path, total_bytes: int, *, accession_number: str | None = None) -> list[Path]:
    """Cine clips of up to 128 MiB adding up to about `total_bytes`, all one study of the demo patient."""
    directory.mkdir(parents=True, exist_ok=True)
    patient = demo.SAMPLE_CASE["patient"]
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    frame_bytes = SIDE * SIDE
    frames_left = max(1, total_bytes // frame_bytes)
    paths: list[Path] = []
    while frames_left > 0:
        frames = min(CLIP_FRAMES, frames_left)
        frames_left -= frames
        path = directory / f"CINE{len(paths):04d}.dcm"
        make_us_instance(
            path,
            study_uid=study_uid,
            series_uid=series_uid,
            frames=max(frames, 2),
            rows=SIDE,
            cols=SIDE,
            patient_name=f"{patient['family_name'].upper()}^{patient['given_name'].upper()}",
            patient_id=patient["mrn"],
            birth_date=patient["birth_date"].replace("-", ""),
            accession_number=accession_number,
        )
        paths.append(path)
    return paths


def zipped_study(directory: Path, total_bytes: int) -> Path:
    """A CD as one ZIP (stored, not deflated: ultrasound pixels barely compress); the clips are removed."""
    archive = directory.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in clips(directory, total_bytes):
            zf.write(path, f"DICOM/{path.name}")
            path.unlink()
    return archive
