import io
from pathlib import Path

import pydicom
import pytest

from services.records import header_probe
from services.records.classify import Unusable, read_dicom_header
from services.records.header_probe import isolated_reader
from tests.dicom_factory import make_us_instance


def test_headers_are_read_in_a_limited_worker(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    make_us_instance(path, study_uid="1.2.3", series_uid="1.2.3.1", frames=2)
    header = isolated_reader(memory_bytes=1024**3, timeout=30)(path)
    assert (header.study_instance_uid, header.number_of_frames, header.identity.patient_id) == (
        "1.2.3",
        2,
        "MRN1",
    )


def test_a_header_that_needs_more_memory_than_the_worker_has_is_a_rejection(tmp_path: Path) -> None:
    ds = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid="1.2.3", series_uid="1.2.3.1")))
    block = ds.private_block(0x0011, "HOSTILE", create=True)
    block.add_new(0x10, "OB", b"\0" * (64 * 1024**2))  # a 64 MiB element before the pixel data
    path = tmp_path / "heavy.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom_header(path).study_instance_uid == "1.2.3"  # legal, just heavy
    # The worker may grow by far less than 64 MiB: the parse fails there, the caller gets a typed rejection.
    with pytest.raises(Unusable, match="exhausted the parser's memory"):
        isolated_reader(memory_bytes=256 * 1024**2, timeout=30)(path)


def test_warming_starts_the_workers_before_the_first_file() -> None:
    memory = 1024**3 + 4096  # a pool of its own
    header_probe.warm(memory)
    try:
        pool = header_probe._pools[memory]
        processes = list((pool._processes or {}).values())  # type: ignore[attr-defined]
        assert len(processes) == header_probe.WORKERS and all(p.is_alive() for p in processes)
    finally:
        header_probe._discard_pool(memory, header_probe._pools[memory])
