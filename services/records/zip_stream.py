"""A CD's ZIP sent as the request body, expanded member by member while it arrives (no spool copy).

Read with stream-unzip (uktrade): it walks the local file headers in order, inflates deflated members and
checks every member's CRC-32 and sizes. The same refusals as `archive.expand_zip` apply, checked as the
bytes come: too many members, a path leaving the root, an encrypted member, an archive inside the
archive, more bytes than one upload may hold, and a compression ratio that only a bomb has (measured on
the bytes received so far, as a stream has no directory to read ahead). A ZIP that cannot be read from
front to back (a stored member whose size only its data descriptor gives) is refused with a pointer to
the multipart route, which spools the archive and reads its central directory.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import stream_unzip

from services.common.errors import RecordsRejected, human_size
from services.records.archive import RATIO_CHECK_FROM_BYTES, Entry, is_archive_head, safe_relative_path
from services.records.limits import ImportLimits
from services.records.store import FileTooLarge, ObjectStore, ReceivedFile

WHERE = "the ZIP archive"
EOCD_SIGNATURE = b"PK\x05\x06"
EOCD = struct.Struct("<4s4H2LH")
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
    bytes are kept, for the end of central directory record."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks, self._limit, self.received = iter(chunks), limit, 0
        self.tail = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.received += len(chunk)
            if self.received > self._limit:
                raise BodyTooLarge()
            self.tail = (self.tail + chunk)[-TAIL_BYTES:] if len(chunk) < TAIL_BYTES else chunk[-TAIL_BYTES:]
            yield chunk


def _check_end(body: _CountedBody, members: int) -> None:
    """The archive must end with its directory: an end of central directory record that counts the
    members read and says where the directory lies. Refuses a ZIP cut short, or one whose directory lists
    files its body does not hold (which another unzip tool would show differently)."""
    found = body.tail.rfind(EOCD_SIGNATURE)
    if found < 0 or len(body.tail) - found < EOCD.size:
        raise refuse("is truncated (its central directory is missing or cut short); create the ZIP again")
    _, _, _, _, entries, cd_size, cd_offset, comment_bytes = EOCD.unpack_from(body.tail, found)
    eocd_at = body.received - (len(body.tail) - found)
    if found + EOCD.size + comment_bytes != len(body.tail):
        raise refuse("has bytes after its end of central directory record; create the ZIP again")
    zip64 = entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    if not zip64 and (entries != members or cd_offset + cd_size != eocd_at):
        raise refuse(
            f"lists {entries} files in its central directory but holds {members}; create the ZIP again"
        )


def expand_zip_stream(
    chunks: Iterable[bytes], *, store: ObjectStore, limits: ImportLimits, upload_limit: int
) -> list[Entry]:
    """Expand the ZIP that `chunks` carry into the store's temp area; on any refusal nothing is kept."""
    body = _CountedBody(chunks, upload_limit)
    # Each member is made durable (its last hash chunk, fsync) on another thread while the next one
    # arrives, instead of the body waiting for the disk at every member's end.
    finishing: list[tuple[Future[ReceivedFile], str, str]] = []
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
            name = raw_name.decode("utf-8", errors="replace")
            if name.endswith("/"):  # a folder entry: nothing to keep
                for _ in data:
                    pass
                continue
            label = f"member {index} of {WHERE}"
            relative = safe_relative_path(name)
            if relative is None:
                raise refuse(f"has a member ({index}) whose path leaves the archive root")
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
            finishing.append((_finishers.submit(incoming.finish), relative, label))
            expanded += incoming.size
            if is_archive_head(incoming.head):
                raise refuse(f"holds another archive (member {index}); upload the files themselves")
        _check_end(body, index)
        return [
            Entry(done.result(), relative, label, from_archive=True) for done, relative, label in finishing
        ]
    except BaseException as exc:
        for done, _, _ in finishing:
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
