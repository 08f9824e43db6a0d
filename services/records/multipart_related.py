"""Reading a STOW-RS body (multipart/related; type="application/dicom") part by part into the temp area.

Nothing is held in memory: each part streams into its own temp file as the request body arrives. A part
larger than one part may be refuses the whole body (FileTooLarge), or, where each part is answered on its
own (STOW-RS), is read past as it arrives and becomes an OversizedPart: its temp file removed at once, only
its first bytes kept, which name the instance. What is wrong with a body as a whole (nothing of it is kept):

    UnsupportedMediaType       (not multipart/related; type="application/dicom": STOW-RS answers 415)
    RecordsRejected
      + MalformedBody          (multipart syntax, truncated, no parts: 400)
      + PartNotDicom           (a part of another media type: 415)
      + TooManyParts           (413)
      + BodyTooLarge           (more bytes than one body may hold: 413)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header

from services.common.errors import RecordsRejected, human_size
from services.records.archive import Entry
from services.records.store import FileTooLarge, IncomingFile, ObjectStore

DICOM_PART = "application/dicom"
# What is kept of an oversized part: its File Meta Information, which names the instance, is a few hundred
# bytes at the start of it.
NAMING_BYTES = 16 * 1024


class UnsupportedMediaType(Exception):
    pass


class MalformedBody(RecordsRejected):
    pass


class PartNotDicom(RecordsRejected):
    pass


class TooManyParts(RecordsRejected):
    pass


class BodyTooLarge(RecordsRejected):
    pass


def boundary_of(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type or "")
    if media_type != b"multipart/related":
        raise UnsupportedMediaType(
            'STOW-RS takes multipart/related; type="application/dicom" with a boundary parameter'
        )
    boundary = options.get(b"boundary", b"").strip(b'"')
    if not boundary:
        raise MalformedBody(
            "the multipart/related Content-Type has no boundary parameter; nothing was stored"
        )
    if len(boundary) > MAX_BOUNDARY_LENGTH:  # the parser refuses it with a FormParserError of its own
        raise MalformedBody(
            f"the multipart/related boundary is longer than {MAX_BOUNDARY_LENGTH} characters (RFC 2046 "
            "allows 70); send a shorter one; nothing was stored"
        )
    part_type = options.get(b"type", DICOM_PART.encode()).strip(b'"').lower()
    if part_type != DICOM_PART.encode():
        raise UnsupportedMediaType('only type="application/dicom" parts are accepted (no DICOM JSON or XML)')
    return boundary


@dataclass(frozen=True)
class OversizedPart:
    """A part larger than `limit`: read past and dropped as it arrived, nothing of it on disk. `head` is its
    beginning (up to NAMING_BYTES), where its File Meta Information names the instance."""

    position: int
    label: str
    size_bytes: int
    limit: int
    head: bytes


class RelatedPartsReader:
    """Feed it the body's chunks; each application/dicom part becomes a received file in the temp area, or,
    with `skip_oversized`, an OversizedPart when it is larger than `limit` (else the body is refused)."""

    def __init__(
        self,
        content_type: str | None,
        store: ObjectStore,
        *,
        max_parts: int,
        limit: int,
        label: str,
        skip_oversized: bool = False,
        max_total: int | None = None,
    ) -> None:
        self.parts: list[Entry | OversizedPart] = []
        self._store, self._max_parts, self._limit, self._label = store, max_parts, limit, label
        self._skip_oversized = skip_oversized
        # Parts read past are not stored, but their bytes still arrive: the body as a whole is bounded too.
        self._max_total, self._total = max_total, 0
        self._in_part = False
        self._incoming: IncomingFile | None = None  # None inside a part: it is over the limit, read past
        self._dropped = 0  # bytes of the current part read past
        self._head = bytearray()
        self._field, self._value = bytearray(), bytearray()
        self._part_type: list[str] = []
        self._parser = MultipartParser(
            boundary_of(content_type),
            {
                "on_part_begin": self._part_type.clear,
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    @property
    def entries(self) -> list[Entry]:
        """The parts received into the temp area."""
        return [part for part in self.parts if isinstance(part, Entry)]

    def feed(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._max_total is not None and self._total > self._max_total:
            self.abort()
            raise BodyTooLarge(
                f"the {self._label} is larger than the {human_size(self._max_total)} one {self._label} may hold; "
                "send fewer instances at once; nothing was stored"
            )
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            self.abort()
            raise self._malformed() from None
        except BaseException:
            self.abort()
            raise

    def _malformed(self) -> MalformedBody:
        return MalformedBody(
            f"the {self._label} is not a well-formed multipart/related body (check the boundary and the "
            "part headers); nothing was stored"
        )

    def close(self) -> list[Entry]:
        try:
            try:
                self._parser.finalize()
            except MultipartParseError:
                raise self._malformed() from None
            if self._in_part:
                raise MalformedBody(f"the {self._label} ends inside a part (truncated); nothing was stored")
            if not self.parts:
                raise MalformedBody(f"the {self._label} has no application/dicom parts; nothing was stored")
        except BaseException:
            self.abort()
            raise
        return self.entries

    def abort(self) -> None:
        if self._incoming is not None:
            self._incoming.abort()
            self._incoming = None
        for entry in self.entries:
            self._store.discard(entry.received)

    def _on_header_end(self) -> None:
        if self._field.decode("latin-1").strip().lower() == "content-type":
            self._part_type.append(self._value.decode("latin-1").split(";")[0].strip().lower())
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        position = len(self.parts) + 1
        if position > self._max_parts:
            raise TooManyParts(f"the {self._label} has more than {self._max_parts} parts; send fewer at once")
        if self._part_type and self._part_type[0] != DICOM_PART:
            raise PartNotDicom(
                f"part {position} of the {self._label} is not application/dicom; nothing was stored"
            )
        self._in_part, self._dropped = True, 0
        self._head.clear()
        self._incoming = self._store.incoming(position=position, total=position, limit=self._limit)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._skip_oversized and len(self._head) < NAMING_BYTES:
            self._head += data[start : min(end, start + NAMING_BYTES - len(self._head))]
        if self._incoming is None:
            self._dropped += end - start
            return
        try:
            self._incoming.write(data[start:end])
        except FileTooLarge:
            if not self._skip_oversized:
                raise
            # The temp file removed itself; the rest of the part is counted and dropped as it arrives.
            self._dropped, self._incoming = self._incoming.size, None

    def _on_part_end(self) -> None:
        position = len(self.parts) + 1
        label = f"part {position} of the {self._label}"
        incoming, self._incoming, self._in_part = self._incoming, None, False
        if incoming is None:
            self.parts.append(OversizedPart(position, label, self._dropped, self._limit, bytes(self._head)))
            return
        received = incoming.finish()
        self.parts.append(Entry(received, None, label, declared_type=DICOM_PART))


async def receive_parts(
    content_type: str | None,
    body: AsyncIterator[bytes],
    store: ObjectStore,
    *,
    max_parts: int,
    limit: int,
    max_total: int,
) -> list[Entry | OversizedPart]:
    """Every part of a STOW-RS request body, in order: a received file, or an OversizedPart for one larger
    than `limit` (refused on its own). A body over `max_total` bytes is refused whole. On any failure of the
    body as a whole nothing is left behind."""
    reader = RelatedPartsReader(
        content_type,
        store,
        max_parts=max_parts,
        limit=limit,
        label="request",
        skip_oversized=True,
        max_total=max_total,
    )
    try:
        async for chunk in body:
            reader.feed(chunk)
    except BaseException:
        reader.abort()
        raise
    reader.close()
    return reader.parts
