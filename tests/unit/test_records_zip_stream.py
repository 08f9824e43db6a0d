"""A ZIP expanded while it arrives (`zip_stream`), and the body feed that hands it to a worker thread."""

import asyncio
import hashlib
import io
import stat
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.body_feed import feed_to_thread
from services.common.errors import RecordsRejected
from services.records.limits import ImportLimits
from services.records.store import ObjectStore
from services.records.zip_stream import BodyTooLarge, expand_zip_stream
from tests.hostile_corpus import zip_of

LIMITS = ImportLimits(max_archive_members=50)
MEMBERS = [("DICOM/IM1", bytes(range(256)) * 400), ("DICOM/IM2", b"\x01" * 3000), ("README.TXT", b"a CD")]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def expand(
    store: ObjectStore, data: bytes, size: int = 4096, upload_limit: int = 10**9
) -> list[tuple[str, bytes]]:
    entries = expand_zip_stream(pieces(data, size), store=store, limits=LIMITS, upload_limit=upload_limit)
    found = []
    for entry in entries:
        content = entry.received.path.read_bytes()
        assert entry.received.sha256 == hashlib.sha256(content).hexdigest()
        found.append((entry.relative_path or "", content))
    return found


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
@pytest.mark.parametrize("size", [1, 977, 1 << 20], ids=["byte-by-byte", "odd-chunks", "one-chunk"])
def test_members_come_out_whole_however_the_body_is_cut(tmp_path: Path, compression: int, size: int) -> None:
    data = zip_of(MEMBERS, compression=compression)
    store = ObjectStore(tmp_path)
    assert expand(store, data, size) == MEMBERS


def unseekable_zip(members: list[tuple[str, bytes]], compression: int) -> bytes:
    """A ZIP as a program writing to a pipe makes it: sizes only in data descriptors after each member."""

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = io.BytesIO()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            return self.data.write(b)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", compression) as zf:
        for name, content in members:
            with zf.open(name, "w") as member:
                member.write(content)
    return pipe.data.getvalue()


def test_deflated_members_with_data_descriptors_stream(tmp_path: Path) -> None:
    assert expand(ObjectStore(tmp_path), unseekable_zip(MEMBERS, zipfile.ZIP_DEFLATED)) == MEMBERS


def refusal(tmp_path: Path, data: bytes, **kwargs: int) -> str:
    store = ObjectStore(tmp_path)
    with pytest.raises(RecordsRejected) as refused:
        expand(store, data, **kwargs)
    assert not store.tmp_dir.exists() or list(store.tmp_dir.iterdir()) == []  # nothing half-kept
    assert "nothing from this upload was stored" in str(refused.value)
    return str(refused.value)


def test_what_cannot_be_streamed_is_refused_with_what_to_do(tmp_path: Path) -> None:
    encrypted = bytearray(zip_of(MEMBERS))
    encrypted[6] |= 1  # the first local header's "encrypted" flag
    assert "password-protected" in refusal(tmp_path, bytes(encrypted))
    stored_later = unseekable_zip(MEMBERS, zipfile.ZIP_STORED)
    assert "send it as multipart form data to /v1/records/" in refusal(tmp_path, stored_later)
    assert "is not a ZIP file" in refusal(tmp_path, b"%PDF-1.7 not an archive" * 10)
    assert "is empty" in refusal(tmp_path, b"")
    assert "bytes after its end of central directory" in refusal(tmp_path, zip_of(MEMBERS) + b"junk")
    cut = zip_of(MEMBERS)
    assert "truncated" in refusal(tmp_path, cut[: len(cut) // 2])
    assert "truncated" in refusal(tmp_path, cut[:-10])  # members whole, directory cut short


def test_a_directory_that_lists_other_files_than_the_body_holds_is_refused(tmp_path: Path) -> None:
    one, two = zip_of(MEMBERS[:1]), zip_of(MEMBERS[:2])
    # The members of `one`, then the central directory and end record of `two`: 1 member, 2 listed.
    first_cd = one.rfind(b"PK\x01\x02")
    second_cd = two.find(b"PK\x01\x02", len(one) - 100)
    spliced = one[:first_cd] + two[second_cd:]
    assert "lists 2 files in its central directory but holds 1" in refusal(tmp_path, spliced)


def zip_with_a_link(*, pipe: bool) -> bytes:
    """MEMBERS with a symbolic link between them, written to a file or (sizes in data descriptors) a pipe."""
    link = zipfile.ZipInfo("DICOM/LINK")
    link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    link.compress_type = zipfile.ZIP_DEFLATED
    written = io.BytesIO()
    target: io.RawIOBase | io.BytesIO = written
    if pipe:

        class Pipe(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: bytes) -> int:  # type: ignore[override]
                return written.write(b)

        target = Pipe()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, content in [(MEMBERS[0][0], MEMBERS[0][1]), (link, b"../../etc/passwd"), *MEMBERS[1:]]:
            with zf.open(info, "w") as member:
                member.write(content)
    return written.getvalue()


@pytest.mark.parametrize("pipe", [False, True], ids=["sizes-in-headers", "data-descriptors"])
@pytest.mark.parametrize("size", [1, 977, 1 << 20], ids=["byte-by-byte", "odd-chunks", "one-chunk"])
def test_a_symbolic_link_is_left_out_however_the_body_is_cut(tmp_path: Path, pipe: bool, size: int) -> None:
    """Only the central directory, at the end, says a member is a link: it was imported as a file holding
    its target's path. Kept out now, and named by position, whatever chunks the body came in."""
    store, left_out = ObjectStore(tmp_path), []
    chunks = pieces(zip_with_a_link(pipe=pipe), size)
    entries = expand_zip_stream(chunks, store=store, limits=LIMITS, upload_limit=10**9, left_out=left_out)
    assert [(e.relative_path, e.received.path.read_bytes()) for e in entries] == MEMBERS
    assert left_out == [
        "member 2 of the ZIP archive is a symbolic link (its data is the path it points to, never "
        "followed): left out, the rest of the upload was imported; add the file itself if it is needed"
    ]
    assert sorted(store.tmp_dir.iterdir()) == sorted(e.received.path for e in entries)


def test_a_member_its_directory_names_otherwise_is_refused(tmp_path: Path) -> None:
    """Another unzip tool, reading the directory, would show another file (and what it is) than was read."""
    data = bytearray(zip_of(MEMBERS))
    at = data.rfind(b"DICOM/IM1")  # in the central directory
    data[at : at + 9] = b"DICOM/IMX"
    assert "has a member (1) its central directory does not list" in refusal(tmp_path, bytes(data))


def test_a_zip_with_zip64_end_records_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Archivers write the ZIP64 end records when they choose (past 65535 members or 4 GiB, or always),
    the classic record keeping real counts: its directory lies before them, not before that record. Such a
    ZIP was refused as one that "lists 3 files in its central directory but holds 3"."""
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # Python's zipfile writes them past this count
    data = zip_of(MEMBERS)
    assert b"PK\x06\x06" in data
    assert expand(ObjectStore(tmp_path), data) == MEMBERS


def test_a_body_past_the_upload_limit_stops_with_nothing_kept(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    with pytest.raises(BodyTooLarge):
        many = [(f"IM{i}", bytes([i]) * 3000) for i in range(30)]
        expand(store, zip_of(many, compression=zipfile.ZIP_STORED), upload_limit=50_000)
    assert list(store.tmp_dir.iterdir()) == []


async def body(chunks: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for index, chunk in enumerate(chunks):
        if index == fail_after:
            raise ConnectionResetError("client went away")
        await asyncio.sleep(0)
        yield chunk


def test_the_feed_hands_every_chunk_in_order() -> None:
    chunks = [bytes([i]) * 1000 for i in range(200)]

    def consume(got: Iterator[bytes]) -> bytes:
        return b"".join(got)

    assert asyncio.run(feed_to_thread(body(chunks), consume, drain_limit=10**6)) == b"".join(chunks)


def test_a_consumer_that_refuses_early_still_lets_the_whole_body_be_read() -> None:
    chunks = [b"x" * 100 for _ in range(500)]
    read: list[int] = []

    async def counted() -> AsyncIterator[bytes]:
        async for chunk in body(chunks):
            read.append(len(chunk))
            yield chunk

    def consume(got: Iterator[bytes]) -> None:
        next(got)
        raise RecordsRejected("refused after the first chunk")

    with pytest.raises(RecordsRejected):
        asyncio.run(feed_to_thread(counted(), consume, drain_limit=10**6))
    assert len(read) == 500  # read to the end: the client can read the answer

    read.clear()
    with pytest.raises(RecordsRejected):
        asyncio.run(feed_to_thread(counted(), consume, drain_limit=10_000))
    assert len(read) < 500  # but not past the drain limit


def test_a_body_that_breaks_off_is_reported_as_such() -> None:
    def consume(got: Iterator[bytes]) -> int:
        return sum(len(c) for c in got)

    with pytest.raises(ConnectionResetError):
        asyncio.run(feed_to_thread(body([b"x"] * 50, fail_after=10), consume, drain_limit=10**6))
