"""A CD's ZIP sent as the request body, expanded member by member while it arrives (no spool copy).

Read with stream-unzip (uktrade): it walks the local file headers in order, inflates deflated members and
checks every member's CRC-32 and sizes. The same refusals as `archive.expand_zip` apply, checked as the
bytes come: too many members, a path leaving the root (at the end, below), an encrypted member, an archive inside the
archive, more bytes than one upload may hold, and a compression ratio that only a bomb has (measured on
the bytes received so far, as a stream has no directory to read ahead). A ZIP that cannot be read from
front to back (a stored member whose size only its data descriptor gives) is refused with a pointer to
the multipart route, which spools the archive and reads its central directory.

What an entry is (a symbolic link, a device file: `archive.not_a_file`) only the central directory says,
at the end: the bytes after each member are kept until the next one starts, so after the last member they
are the directory, read then. Entries that are not files are then dropped from what was expanded and named
(by position) in `left_out`; a member the directory does not list is refused. A member whose path leaves the
root is never written: it is refused once the directory says it is a regular file, and left out as the
multipart route leaves it out if it is a link (whose data is only the path it points to).
"""

from __future__ import annotations

import collections
import contextlib
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import stream_unzip

from services.common.errors import RecordsRejected, human_size
from services.records.archive import (
    RATIO_CHECK_FROM_BYTES,
    Entry,
    is_archive_head,
    left_out_note,
    not_a_file,
    safe_relative_path,
)
from services.records.limits import ImportLimits
from services.records.store import FileTooLarge, ObjectStore, ReceivedFile

WHERE = "the ZIP archive"
EOCD_SIGNATURE = b"PK\x05\x06"
EOCD = struct.Struct("<4s4H2LH")
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")
CENTRAL_SIGNATURE = b"PK\x01\x02"
# The central directory is kept in memory to be read: this much per member allowed (a name, its extras).
DIRECTORY_BYTES_PER_MEMBER = 4096
TAIL_BYTES = EOCD.size + 0xFFFF  # the record and the longest comment it may carry
_finishers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zip-member-fsync")
# Members come out in chunks no larger than this (the body's own chunks are passed through unsplit).
MEMBER_CHUNK_BYTES = 1024 * 1024


class BodyTooLarge(Exception):
    """The request body itself passed the upload limit (a 413, not a refusal of the archive's content)."""


def refuse(problem: str) -> RecordsRejected:
    return RecordsRejected(f"{WHERE} {problem}; nothing from this upload was stored")


class _CountedBody:
    """The body's chunks, counted as stream-unzip takes them, refused past the upload limit; the last
    bytes are kept, for the end of central directory record, and between members (`keep_from_here`,
    `stop_keeping`) the bytes that follow, for the central directory."""

    def __init__(self, chunks: Iterable[bytes], limit: int, keep_limit: int) -> None:
        self._chunks, self._limit, self.received = iter(chunks), limit, 0
        self.tail = b""
        # The chunks last read: at least two, and at least TAIL_BYTES (stream-unzip reads a few bytes past a
        # member's end, a data descriptor and the next signature, maybe from the next chunk or few).
        self._recent: collections.deque[bytes] = collections.deque()
        self._recent_bytes = 0
        self._keep_limit = keep_limit
        self._kept: list[bytes] | None = None  # chunks, joined once the directory is read (`kept`)
        self.kept_from = 0  # the offset in the body of the first byte kept
        self._kept_beyond = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.received += len(chunk)
            if self.received > self._limit:
                raise BodyTooLarge()
            self.tail = (self.tail + chunk)[-TAIL_BYTES:] if len(chunk) < TAIL_BYTES else chunk[-TAIL_BYTES:]
            self._recent.append(chunk)
            self._recent_bytes += len(chunk)
            while len(self._recent) > 2 and self._recent_bytes - len(self._recent[0]) >= TAIL_BYTES:
                self._recent_bytes -= len(self._recent.popleft())
            if self._kept is not None:
                self._kept.append(chunk)
                self._kept_beyond += len(chunk)
                if self._kept_beyond > self._keep_limit:
                    raise refuse(
                        f"has a central directory larger than {human_size(self._keep_limit)}; "
                        "create the ZIP again"
                    )
            yield chunk

    def keep_from_here(self) -> None:
        """A member's data has been read: keep what follows it (from the last chunks read)."""
        self._kept = list(self._recent)
        self.kept_from = self.received - self._recent_bytes
        self._kept_beyond = 0

    def stop_keeping(self) -> None:
        """A member starts: what follows is its data, not the directory."""
        self._kept = None

    @property
    def kept(self) -> bytes | None:
        """The bytes kept since the last member's data ended (after the last member: the directory)."""
        if self._kept is None:
            return None
        if len(self._kept) != 1:
            self._kept = [b"".join(self._kept)]
        return self._kept[0]


def _check_end(body: _CountedBody, members: int) -> tuple[int, int] | None:
    """The archive must end with its directory: an end of central directory record (and, for ZIP64, the
    ZIP64 end record it locates) that counts the members read and says where the directory lies. Refuses a
    ZIP cut short, or one whose directory lists files its body does not hold (which another unzip tool would
    show differently). Where the central directory lies (offset, size); None for a ZIP64 archive whose ZIP64
    records cannot be found."""
    found = body.tail.rfind(EOCD_SIGNATURE)
    if found < 0 or len(body.tail) - found < EOCD.size:
        raise refuse("is truncated (its central directory is missing or cut short); create the ZIP again")
    _, _, _, _, entries, cd_size, cd_offset, comment_bytes = EOCD.unpack_from(body.tail, found)
    directory_end = body.received - (len(body.tail) - found)
    if found + EOCD.size + comment_bytes != len(body.tail):
        raise refuse("has bytes after its end of central directory record; create the ZIP again")
    zip64 = _zip64_end(body, found)
    if zip64 is not None:  # written whenever the archiver chose to, its values saturated in the record or not
        entries, cd_size, cd_offset, directory_end = zip64
    elif entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        return None
    if entries != members or cd_offset + cd_size != directory_end:
        raise refuse(
            f"lists {entries} files in its central directory but holds {members}; create the ZIP again"
        )
    return cd_offset, cd_size


def _zip64_end(body: _CountedBody, eocd_found: int) -> tuple[int, int, int, int] | None:
    """A ZIP64 archive's entries, directory size and offset, and where its ZIP64 end record lies (right
    after the directory), from that record (its locator stands just before the end of central directory
    record); None without one."""
    at = eocd_found - ZIP64_LOCATOR.size
    if at < 0 or body.tail[at : at + 4] != b"PK\x06\x07":
        return None
    _, _, record_at, _ = ZIP64_LOCATOR.unpack_from(body.tail, at)
    kept, kept_from = body.kept, body.kept_from
    if kept is None:
        kept, kept_from = body.tail, body.received - len(body.tail)
    start = record_at - kept_from
    if start < 0 or start + ZIP64_EOCD.size > len(kept) or kept[start : start + 4] != b"PK\x06\x06":
        return None
    *_, entries, cd_size, cd_offset = ZIP64_EOCD.unpack_from(kept, start)
    return entries, cd_size, cd_offset, record_at


def _directory(body: _CountedBody, where: tuple[int, int] | None) -> list[tuple[str, int, int]]:
    """The central directory's entries (name, external attributes, uncompressed size), in its order."""
    kept = body.kept
    start = -1 if where is None or kept is None else where[0] - body.kept_from
    if where is None or kept is None or start < 0 or start + where[1] > len(kept):
        raise refuse("has a central directory that cannot be read; create the ZIP again")
    directory, at, found = memoryview(kept)[start : start + where[1]], 0, []
    while at + CENTRAL_HEADER.size <= len(directory):
        fields = CENTRAL_HEADER.unpack_from(directory, at)
        if fields[0] != CENTRAL_SIGNATURE:
            break
        size, name_bytes, extra_bytes, comment_bytes, external = (
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[15],
        )
        name_at = at + CENTRAL_HEADER.size
        name = bytes(directory[name_at : name_at + name_bytes]).decode("utf-8", errors="replace")
        found.append((name, external, size))
        at = name_at + name_bytes + extra_bytes + comment_bytes
    return found


def _not_files(names: list[tuple[int, str, int]], directory: list[tuple[str, int, int]]) -> dict[int, str]:
    """Members (by index) that the directory says are not regular files, and what each is. Each member read
    is matched to the directory's entry of its name; one the directory does not list is refused."""
    listed: dict[str, list[int]] = {}
    for name, external, _ in directory:
        listed.setdefault(name, []).append(external)
    found: dict[int, str] = {}
    for index, name, size in names:
        attributes = listed.get(name)
        if not attributes:
            raise refuse(f"has a member ({index}) its central directory does not list; create the ZIP again")
        what = not_a_file(name, attributes.pop(0), size)
        if what:
            found[index] = what
    return found


def expand_zip_stream(
    chunks: Iterable[bytes],
    *,
    store: ObjectStore,
    limits: ImportLimits,
    upload_limit: int,
    left_out: list[str] | None = None,
) -> list[Entry]:
    """Expand the ZIP that `chunks` carry into the store's temp area; on any refusal nothing is kept.
    Entries that are not regular files are dropped once the directory says so: why, in `left_out`."""
    body = _CountedBody(
        chunks, upload_limit, TAIL_BYTES + limits.max_archive_members * DIRECTORY_BYTES_PER_MEMBER
    )
    # Each member is made durable (its last hash chunk, fsync) on another thread while the next one
    # arrives, instead of the body waiting for the disk at every member's end.
    finishing: list[tuple[Future[ReceivedFile], str, str, int]] = []
    read: list[tuple[int, str, int]] = []  # every entry read: index, name, bytes
    escaping: list[int] = []  # members whose path leaves the root: not kept, refused unless not files
    try:
        members = stream_unzip.stream_unzip(
            body,
            chunk_size=MEMBER_CHUNK_BYTES,
            allowed_encryption_mechanisms=(stream_unzip.NO_ENCRYPTION,),
        )
        expanded, index = 0, 0
        for index, (raw_name, declared_size, data) in enumerate(members, start=1):
            if index > limits.max_archive_members:
                raise refuse(
                    f"has at least {index} files, more than the {limits.max_archive_members} "
                    "one upload may hold"
                )
            body.stop_keeping()
            name = raw_name.decode("utf-8", errors="replace")
            if name.endswith("/"):  # a folder entry: nothing to keep (data in one is said at the end)
                read.append((index, name, sum(len(chunk) for chunk in data)))
                body.keep_from_here()
                continue
            label = f"member {index} of {WHERE}"
            relative = safe_relative_path(name)
            if relative is None:  # refused at the end, unless the directory says it is no file (a link)
                drained = 0
                for chunk in data:
                    drained += len(chunk)
                    if expanded + drained > limits.max_archive_total_bytes:
                        raise refuse(
                            f"expands to more than {human_size(limits.max_archive_total_bytes)}, "
                            "more than one upload may hold"
                        )
                read.append((index, name, drained))
                escaping.append(index)
                expanded += drained
                body.keep_from_here()
                continue
            remaining = limits.max_archive_total_bytes - expanded
            if declared_size is not None and declared_size > remaining:
                raise refuse(
                    f"expands to more than {human_size(limits.max_archive_total_bytes)}, "
                    "more than one upload may hold"
                )
            incoming = store.incoming(position=1, total=1, limit=min(upload_limit, remaining))
            try:
                for chunk in data:
                    incoming.write(chunk)
                    written = expanded + incoming.size
                    if written > RATIO_CHECK_FROM_BYTES and written > limits.max_compression_ratio * max(
                        body.received, 1
                    ):
                        raise refuse(
                            f"has a member ({index}) compressed more than "
                            f"{limits.max_compression_ratio}:1, as only a ZIP bomb is"
                        )
            except BaseException:
                incoming.abort()
                raise
            body.keep_from_here()
            finishing.append((_finishers.submit(incoming.finish), relative, label, index))
            read.append((index, name, incoming.size))
            expanded += incoming.size
            if is_archive_head(incoming.head):
                raise refuse(f"holds another archive (member {index}); upload the files themselves")
        where = _check_end(body, index)
        not_files = _not_files(read, _directory(body, where)) if read else {}
        for at in escaping:  # as the multipart route: a link is left out whatever its path says
            if at not in not_files:
                raise refuse(f"has a member ({at}) whose path leaves the archive root")
        entries = []
        for done, relative, label, at in finishing:
            if at in not_files:
                store.discard(done.result())
            else:
                entries.append(Entry(done.result(), relative, label, from_archive=True))
        if left_out is not None:
            left_out += [
                left_out_note(f"member {at} of {WHERE}", what) for at, what in sorted(not_files.items())
            ]
        return entries
    except BaseException as exc:
        for done, _, _, _ in finishing:
            with contextlib.suppress(Exception):  # a member that failed to finish removed itself
                store.discard(done.result())
        if body.received == 0 and isinstance(exc, stream_unzip.UnzipError):
            raise refuse("is empty; send the ZIP file's bytes as the request body") from None
        raise _refusal_for(exc, limits, upload_limit) from None


def _refusal_for(exc: BaseException, limits: ImportLimits, upload_limit: int) -> BaseException:
    """What to tell the uploader about an archive stream-unzip (or a limit) stopped."""
    if isinstance(exc, FileTooLarge):
        return refuse(
            f"expands beyond {human_size(min(upload_limit, limits.max_archive_total_bytes))}, "
            "more than one upload may hold"
        )
    if isinstance(
        exc,
        stream_unzip.EncryptionMechanismNotAllowed
        | stream_unzip.MissingPasswordError
        | stream_unzip.PasswordError,
    ):
        return refuse("is password-protected; upload an unencrypted archive")
    if isinstance(exc, stream_unzip.NotStreamUnzippable):
        return refuse(
            "has a stored member whose size only its trailing data descriptor gives, so it cannot be "
            "expanded as it arrives; send it as multipart form data to /v1/records/{case_id}/files instead"
        )
    if isinstance(exc, stream_unzip.UnsupportedCompressionTypeError | stream_unzip.UnsupportedFeatureError):
        return refuse("uses a compression or feature that cannot be read; create the ZIP again with deflate")
    if isinstance(exc, stream_unzip.UnexpectedSignatureError):
        return refuse("is not a ZIP file, or is corrupt; send the .zip file's bytes as the request body")
    if isinstance(exc, stream_unzip.UnzipError):
        return refuse("cannot be read (it is truncated or corrupt); create the ZIP again")
    return exc
