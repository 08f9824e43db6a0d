import hashlib
import io
from pathlib import Path

import pytest

from services.common.errors import human_size
from services.records.store import CHUNK_BYTES, FileTooLarge, ObjectStore


def test_receive_hashes_while_streaming_and_keep_moves_into_the_content_address(tmp_path: Path) -> None:
    data = bytes(range(256)) * (CHUNK_BYTES // 256 + 7)  # more than one chunk
    store = ObjectStore(tmp_path)
    received = store.receive(io.BytesIO(data), position=1, total=1, limit=len(data))
    digest = hashlib.sha256(data).hexdigest()
    assert (received.sha256, received.size_bytes, received.utf8_text) == (digest, len(data), False)
    assert received.head == data[:132]

    relative = store.keep(received)
    assert relative == f"objects/{digest[:2]}/{digest}"
    assert store.path(relative).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


def test_keeping_the_same_content_twice_keeps_one_object(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    first = store.keep(store.receive(io.BytesIO(b"report"), position=1, total=2, limit=100))
    second = store.keep(store.receive(io.BytesIO(b"report"), position=2, total=2, limit=100))
    assert first == second
    assert len(list(store.objects_dir.rglob("*"))) == 2  # one fan-out directory, one object
    assert list(store.tmp_dir.iterdir()) == []


def test_utf8_text_split_across_chunks_is_text(tmp_path: Path) -> None:
    data = ("ä" * CHUNK_BYTES).encode()  # two-byte characters straddle every chunk boundary
    received = ObjectStore(tmp_path).receive(io.BytesIO(data), position=1, total=1, limit=len(data))
    assert received.utf8_text


def test_a_file_over_the_limit_is_refused_and_its_temp_file_removed(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    with pytest.raises(FileTooLarge, match=r"^file 2 of 3 is larger than the 1 KiB limit; nothing"):
        store.receive(io.BytesIO(b"x" * 1025), position=2, total=3, limit=1024)
    assert list(store.tmp_dir.iterdir()) == []


def test_human_size() -> None:
    assert [human_size(n) for n in (100, 2048, 512 * 1024 * 1024)] == ["100 bytes", "2 KiB", "512 MiB"]


def test_a_reused_buffer_is_hashed_as_it_was_written(tmp_path: Path) -> None:
    # Large chunks are hashed on another thread after write() returns; a caller that refills one buffer
    # (a socket reader, say) must still get the hash of what was written, in order.
    store = ObjectStore(tmp_path)
    incoming = store.incoming(position=1, total=1, limit=10 * CHUNK_BYTES)
    buffer = bytearray(CHUNK_BYTES)
    written = hashlib.sha256()
    for fill in range(5):
        buffer[:] = bytes([fill]) * CHUNK_BYTES
        incoming.write(buffer)  # type: ignore[arg-type]
        written.update(buffer)
    received = incoming.finish()
    assert received.sha256 == written.hexdigest()
    assert received.path.read_bytes() == b"".join(bytes([f]) * CHUNK_BYTES for f in range(5))
