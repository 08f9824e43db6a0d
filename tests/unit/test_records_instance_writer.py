"""Instances received over DIMSE are spooled to disk fragment by fragment as they arrive, finished (hashed,
fsynced) on a thread of their own, and none is indexed before all are."""

import hashlib
import io
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from services.records import dimse
from services.records.dimse import OUT_OF_RESOURCES, SUCCESS, InstanceWriter, PacsUnavailable, SpooledInstance
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance

FRAGMENT = 1000  # small fragments and batches, so that one instance spans many of each


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse, "SPOOL_BATCH_BYTES", 8 * FRAGMENT)


def ps310(frames: int) -> bytes:
    """A PS3.10 file as pynetdicom spools it: preamble, file meta, then the dataset as it came."""
    return make_us_instance(None, study_uid="1.2.3", series_uid="1.2.3.1", frames=frames)


def spool(directory: Path, data: bytes, *, limit: int = 10**9, position: int = 1) -> SpooledInstance:
    """Write `data` the way pynetdicom does: the preamble and meta first, then fragment by fragment."""
    spooled = SpooledInstance(directory, position, limit)
    spooled.write(data[:128])
    spooled.write(data[128:132])
    for start in range(132, len(data), FRAGMENT):
        spooled.write(data[start : start + FRAGMENT])
        spooled.file.flush()
    return spooled


def c_store(spooled: object) -> SimpleNamespace:
    """What pynetdicom hands an EVT_C_STORE handler when it spooled the dataset."""
    return SimpleNamespace(request=SimpleNamespace(_dataset_file=spooled))


def test_a_spooled_instance_is_the_file_as_sent_with_its_hash(tmp_path: Path) -> None:
    data = ps310(frames=5)
    spooled = spool(tmp_path, data)
    spooled.take()
    received = spooled.finish()
    assert received.path.read_bytes() == data
    assert received.sha256 == hashlib.sha256(data).hexdigest()
    assert (received.size_bytes, received.head, received.utf8_text) == (len(data), data[:132], False)
    assert int(pydicom.dcmread(received.path).NumberOfFrames) == 5
    assert [p.name for p in tmp_path.iterdir()] == [received.path.name]


def test_every_instance_is_finished_whole_and_in_order(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    writer = InstanceWriter(store)
    for position, frames in enumerate((1, 2, 3, 4, 5), start=1):
        assert writer.write(c_store(spool(store.tmp_dir, ps310(frames), position=position))) == SUCCESS
    entries = writer.entries()
    assert [e.label for e in entries] == [f"retrieved instance {i}" for i in range(1, 6)]
    for entry, frames in zip(entries, (1, 2, 3, 4, 5), strict=True):
        ds = pydicom.dcmread(entry.received.path)
        assert int(ds.get("NumberOfFrames", 1)) == frames and ds.StudyInstanceUID == "1.2.3"


def test_pynetdicoms_unlink_after_the_handler_does_not_remove_a_taken_file(tmp_path: Path) -> None:
    """A C-STORE SCP (our C-MOVE destination) unlinks the spooled file by name once the handler returns."""
    spooled = spool(tmp_path, ps310(frames=2))
    spooled.take()
    Path(spooled.name).unlink(missing_ok=True)  # what pynetdicom's storage service does
    assert pydicom.dcmread(spooled.finish().path).StudyInstanceUID == "1.2.3"


def test_an_instance_over_the_limit_is_refused_and_fails_the_retrieval_with_nothing_kept(
    tmp_path: Path,
) -> None:
    store = ObjectStore(tmp_path)
    writer = InstanceWriter(store)
    small = ps310(frames=1)
    assert writer.write(c_store(spool(store.tmp_dir, small, limit=len(small) + 2048))) == SUCCESS
    too_large = spool(store.tmp_dir, ps310(frames=8), limit=len(small) + 2048, position=2)
    assert writer.write(c_store(too_large)) == OUT_OF_RESOURCES
    with pytest.raises(PacsUnavailable, match=r"could not be stored \(FileTooLarge\)"):
        writer.entries()
    assert list(store.tmp_dir.iterdir()) == []


def test_an_instance_without_a_spool_is_refused(tmp_path: Path) -> None:
    writer = InstanceWriter(ObjectStore(tmp_path))
    event = SimpleNamespace(request=SimpleNamespace(_dataset_file=None, DataSet=io.BytesIO(b"")))
    assert writer.write(event) == OUT_OF_RESOURCES
    with pytest.raises(PacsUnavailable, match="could not be stored"):
        writer.entries()


def test_what_an_ended_association_left_unfinished_is_removed(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    dul = threading.Thread(target=lambda: None)
    with dimse._spooling(dul, store, limit=10**9):
        spooled = dimse._spools[dul].open()
        data = ps310(frames=3)
        spooled.write(data[: len(data) // 2])  # the association is aborted mid-instance
        assert len(list(store.tmp_dir.iterdir())) == 1
    assert list(store.tmp_dir.iterdir()) == []


def test_other_threads_get_pynetdicoms_own_temporary_file(tmp_path: Path) -> None:
    other = dimse._spooled_or_temporary(delete=False, mode="wb", suffix=".dcm")
    try:
        assert not isinstance(other, SpooledInstance)
    finally:
        other.close()
        Path(other.name).unlink()


def test_a_pdu_is_read_whole_or_up_to_a_closed_connection() -> None:
    """pynetdicom's socket read, replaced by one reading straight into one buffer: same contract."""
    ours, peer = socket.socketpair()
    try:
        wrapped = SimpleNamespace(socket=ours)
        peer.sendall(b"0123")
        peer.sendall(b"456789")
        assert dimse._recv_whole(wrapped, 6) == bytearray(b"012345")  # type: ignore[arg-type]
        peer.close()
        assert dimse._recv_whole(wrapped, 16) == bytearray(b"6789")  # type: ignore[arg-type]
        assert dimse._recv_whole(wrapped, 16) == bytearray()  # type: ignore[arg-type]
    finally:
        ours.close()
