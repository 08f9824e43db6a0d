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

from services.records import dimse, uploads
from services.records.classify import DicomHeader, read_dicom_header
from services.records.dimse import OUT_OF_RESOURCES, SUCCESS, InstanceWriter, PacsUnavailable, SpooledInstance
from services.records.limits import get_limits
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


def test_an_unusable_instance_is_refused_on_its_own_with_why_and_the_rest_kept(tmp_path: Path) -> None:
    """PS3.4 B.2.3: each C-STORE is answered for its own instance. One the import would refuse is refused
    as it arrives, with a failure status and an Error Comment saying what is wrong (never a value from it),
    and removed; the usable ones are kept, and the retrieval says which were refused and why."""
    store = ObjectStore(tmp_path)
    writer = InstanceWriter(store)
    good = ps310(frames=1)
    dataset = pydicom.dcmread(io.BytesIO(ps310(frames=1)))
    del dataset.SeriesInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert writer.write(c_store(spool(store.tmp_dir, good))) == SUCCESS
    refused = writer.write(c_store(spool(store.tmp_dir, buffer.getvalue(), position=2)))
    assert isinstance(refused, pydicom.Dataset)
    assert (refused.Status, refused.ErrorComment) == (
        dimse.DOES_NOT_MATCH_SOP_CLASS,
        "Instance is DICOM without a valid SeriesInstanceUID",
    )
    cut = pydicom.dcmread(io.BytesIO(ps310(frames=1)))
    cut.Rows = 128  # declares twice the pixels it holds
    buffer = io.BytesIO()
    cut.save_as(buffer, enforce_file_format=True)
    short = writer.write(c_store(spool(store.tmp_dir, buffer.getvalue(), position=3)))
    assert isinstance(short, pydicom.Dataset) and short.Status == dimse.CANNOT_UNDERSTAND
    assert len(short.ErrorComment) <= 64 and "DOE" not in short.ErrorComment
    [kept] = writer.entries()
    assert kept.received.path.read_bytes() == good
    assert writer.refused == [
        "retrieved instance 2 is DICOM without a valid SeriesInstanceUID (a UID is digits and dots, at "
        "most 64 characters); ask the facility for an export with valid UIDs",
        "retrieved instance 3 holds less pixel data than its Rows, Columns, Number of Frames, Samples per "
        "Pixel and Bits Allocated declare (its header does not describe its image); ask the facility for "
        "a new export",
    ]
    assert [p.name for p in store.tmp_dir.iterdir()] == [kept.received.path.name]


def test_a_retrieved_instance_beyond_the_import_budgets_is_refused_as_it_arrives(tmp_path: Path) -> None:
    """Retrievals read headers within the upload's budgets: an instance with a huge private element before
    its pixel data is refused with A700 (Out of Resources), the rest kept."""
    from services.records.limits import ImportLimits
    from services.records.retrieval import _header_reader
    from tests.hostile_corpus import huge_private_element

    store = ObjectStore(tmp_path)
    limits = ImportLimits(parse_in_subprocess=False, max_header_bytes=1024 * 1024)
    writer = InstanceWriter(store, read_header=_header_reader(limits))
    answer = writer.write(c_store(spool(store.tmp_dir, huge_private_element(2 * 1024 * 1024))))
    assert isinstance(answer, pydicom.Dataset) and answer.Status == OUT_OF_RESOURCES
    assert answer.ErrorComment == "Instance carries 2.001 MiB before its pixel data"
    assert writer.write(c_store(spool(store.tmp_dir, ps310(frames=1), position=2))) == SUCCESS
    assert len(writer.entries()) == 1 and len(writer.refused) == 1


def test_an_instance_its_c_store_request_misnames_is_refused(tmp_path: Path) -> None:
    """The data set's SOP Class and Instance UIDs must be the ones the request names (pynetdicom writes the
    file meta from the request): otherwise 0xA900, Data Set does not match SOP Class."""
    store = ObjectStore(tmp_path)
    writer = InstanceWriter(store)
    data = ps310(frames=1)
    dataset = pydicom.dcmread(io.BytesIO(data))
    as_sent = {"AffectedSOPClassUID": dataset.SOPClassUID, "AffectedSOPInstanceUID": dataset.SOPInstanceUID}
    misnamed = [
        {**as_sent, "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},
        {**as_sent, "AffectedSOPInstanceUID": dataset.SOPInstanceUID + ".1"},
    ]
    for position, request in enumerate(misnamed, start=1):
        event = SimpleNamespace(
            request=SimpleNamespace(_dataset_file=spool(store.tmp_dir, data, position=position), **request)
        )
        answer = writer.write(event)
        assert isinstance(answer, pydicom.Dataset) and answer.Status == dimse.DOES_NOT_MATCH_SOP_CLASS
        assert answer.ErrorComment.endswith("UID than its C-STORE request")
    event = SimpleNamespace(request=SimpleNamespace(_dataset_file=spool(store.tmp_dir, data), **as_sent))
    assert writer.write(event) == SUCCESS
    assert len(writer.entries()) == 1 and len(writer.refused) == 2


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


def test_each_retrieved_header_is_read_once_as_it_arrives_and_the_import_takes_it_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header read to answer the C-STORE travels with the instance: the import's classification (which
    reads headers in an isolated worker, a round trip each) does not read the file again."""
    store = ObjectStore(tmp_path)
    reads: list[Path] = []

    def counting(path: Path) -> DicomHeader:
        reads.append(path)
        return read_dicom_header(path)

    writer = InstanceWriter(store, read_header=counting)
    for position, frames in enumerate((1, 3), start=1):
        assert writer.write(c_store(spool(store.tmp_dir, ps310(frames), position=position))) == SUCCESS
    entries = writer.entries()
    assert len(reads) == 2 and [e.header.number_of_frames for e in entries if e.header] == [1, 3]

    def read_again(path: Path) -> DicomHeader:
        raise AssertionError(f"the import read {path} again")

    monkeypatch.setattr(uploads, "header_reader", lambda limits: read_again)
    classified = uploads._classify(entries, get_limits())
    assert [c.dicom.number_of_frames for c in classified if c.dicom] == [1, 3]
