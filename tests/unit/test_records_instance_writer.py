"""Instances received over DIMSE are written on a thread of their own; none is indexed before all are."""

import io
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from services.records.dimse import InstanceWriter, PacsUnavailable
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance


def c_store(frames: int) -> SimpleNamespace:
    """What pynetdicom hands an EVT_C_STORE handler: the file meta and the dataset bytes as received."""
    data = make_us_instance(None, study_uid="1.2.3", series_uid="1.2.3.1", frames=frames)
    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = ds.file_meta.TransferSyntaxUID
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    write_dataset(body, ds)  # the dataset without preamble and file meta, as it comes over the wire
    return SimpleNamespace(
        file_meta=ds.file_meta, request=SimpleNamespace(DataSet=io.BytesIO(body.getvalue()))
    )


def test_every_instance_is_written_whole_and_readable(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    writer = InstanceWriter(store, limit=10**9)
    events = [c_store(frames) for frames in (1, 2, 3, 4, 5)]
    for event in events:
        writer.write(event)
    entries = writer.entries()
    assert [e.label for e in entries] == [f"retrieved instance {i}" for i in range(1, 6)]
    for entry, frames in zip(entries, (1, 2, 3, 4, 5), strict=True):
        ds = pydicom.dcmread(entry.received.path)
        assert int(ds.get("NumberOfFrames", 1)) == frames and ds.StudyInstanceUID == "1.2.3"


def test_a_failed_write_fails_the_retrieval_with_nothing_kept(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    small = len(c_store(1).request.DataSet.getvalue()) + 2048
    writer = InstanceWriter(store, limit=small)
    writer.write(c_store(1))
    writer.write(c_store(8))  # larger than the limit: its write fails on the writer thread
    with pytest.raises(PacsUnavailable, match="could not be stored"):
        writer.entries()
    assert list(store.tmp_dir.iterdir()) == []
