"""Video clips rendered as MP4 (PS3.18 8.7.4, Table 8.7.4-1 "Video": video/mp4): an instance whose Pixel Data
is an MPEG-2, MPEG-4 AVC/H.264 or HEVC/H.265 bitstream (PS3.5 8.2.5 to 8.2.8, transfer syntaxes
1.2.840.10008.1.2.4.100 to .108) is *remuxed* into an MP4: the stored bitstream is copied into the container,
never re-encoded (same quality, little CPU). H.264 and HEVC play so in a browser's <video>; MPEG-2 in an MP4
plays in players only, so a browser is given a WebM of it (webm.py, which re-encodes through this module's
`Bitstream` and cache).

PyAV (FFmpeg's libavformat) does the muxing; no ffmpeg program is run. The bitstream is read from the stored
file fragment by fragment as the demuxer asks, and the MP4 is written to a file in a local cache
(`RECORDS_RENDER_VIDEO_CACHE_*`, keyed by the stored file's SHA-256, the format version and the media type; the
WebMs are kept there too), with its index (`moov`) first ("faststart") so that playback starts before the whole
clip has arrived; the file is served with HTTP Range support (a <video> element seeks with Range requests).

An elementary stream carries no timestamps: each frame is timed by the bitstream's own frame rate (H.264/HEVC
VUI timing, the MPEG-2 sequence header) or, when it has none, by the instance's (Cine Rate, Frame Time,
Recommended Display Frame Rate). A stream with B-frames is decoded once (the pictures thrown away) to learn
the order its frames are shown in, which the MP4 must state; nothing is encoded.

What cannot be remuxed is a `NotRendered` (rendering.py): 406 when the bitstream cannot be read, 503 when the
cache cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import pydicom
import pydicom.uid
import structlog
from pydicom.dataset import Dataset

from services.records.rendering import VIDEO_SYNTAXES, NotRendered, RenderLimits

log = structlog.get_logger(__name__)

MP4, WEBM = "video/mp4", "video/webm"
VIDEO_RENDERED_TYPES = (MP4, WEBM)
# The FFmpeg demuxer of each bitstream: H.264 and HEVC are Annex B byte streams; MPEG-2 may be an elementary or
# a program stream, which FFmpeg tells apart by probing.
DEMUXERS: dict[str, str | None] = {
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[:4], None),
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[4:14], "h264"),
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[14:], "hevc"),
}
UNTIMED = {"h264", "hevc", "mpegvideo"}  # elementary streams: packets come without timestamps
PIXEL_DATA = b"\xe0\x7f\x10\x00"
ITEM, SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000) and (FFFE,E0DD) read as little-endian words
CHUNK = 1 << 20
# In the cache's file names: a change to how clips are remuxed (MP4) or encoded (WebM) makes older files unused.
FORMAT_VERSIONS = {MP4: 1, WEBM: 1}


@dataclass(frozen=True)
class Clip:
    """A stored video instance: its file, header and where its encapsulated Pixel Data starts."""

    path: Path
    header: Dataset
    syntax: pydicom.uid.UID
    pixels_at: int
    cache_key: str


def clip(path: Path, cache_key: str) -> Clip | None:
    """The instance at `path` as a video clip, None when its transfer syntax is no video one."""
    with path.open("rb") as fp:
        header = pydicom.dcmread(fp, stop_before_pixels=True)
        pixels_at = fp.tell()
    syntax = pydicom.uid.UID(str(header.file_meta.get("TransferSyntaxUID") or ""))
    if syntax not in VIDEO_SYNTAXES:
        return None
    return Clip(path, header, syntax, pixels_at, cache_key)


class Bitstream:
    """The clip's bitstream, read from its Pixel Data fragments as the demuxer asks (PS3.5 A.4): never the
    whole clip in memory, however large its fragments are."""

    def __init__(self, fp: IO[bytes], pixels_at: int) -> None:
        self._fp = fp
        fp.seek(pixels_at)
        head = fp.read(12)
        if len(head) < 12 or head[:4] != PIXEL_DATA or head[8:12] != b"\xff\xff\xff\xff":
            raise NotRendered(
                406, "this clip's Pixel Data is not encapsulated as PS3.5 A.4 requires: retrieve it as stored"
            )
        self._left = 0  # bytes of the current fragment not yet read
        self._ended = False
        self._next_item(skip=True)  # the Basic Offset Table: no use for one bitstream

    def _next_item(self, skip: bool = False) -> None:
        head = self._fp.read(8)
        if len(head) < 8:
            self._ended = True
            return
        tag, length = struct.unpack("<II", head)
        if tag != ITEM:
            self._ended = True  # the sequence delimiter (or anything else) ends the bitstream
            return
        if skip:
            self._fp.seek(length, os.SEEK_CUR)
            self._left = 0
        else:
            self._left = length

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while not self._ended:
            if self._left:
                data = self._fp.read(min(size, self._left))
                if not data:
                    self._ended = True
                    break
                self._left -= len(data)
                return data
            self._next_item()
        return b""


def frame_rate(stream_rate: Fraction | None, header: Dataset) -> Fraction:
    """Frames a second: the bitstream's own, else the instance's (PS3.3 C.7.6.5 Cine Module), else 25."""
    if stream_rate and 0 < stream_rate <= 1000:
        return Fraction(stream_rate)
    if header.get("CineRate"):
        return Fraction(str(header.CineRate)).limit_denominator(1001)
    if header.get("FrameTime") and float(header.FrameTime) > 0:
        return (1000 / Fraction(str(header.FrameTime))).limit_denominator(1001)
    if header.get("RecommendedDisplayFrameRate"):
        return Fraction(str(header.RecommendedDisplayFrameRate)).limit_denominator(1001)
    return Fraction(25)


# --- the cache of rendered clips (MP4 remuxed, WebM encoded) ------------------------------------------------------------------


def cache_dir(limits: RenderLimits) -> Path:
    where = Path(limits.video_cache_dir or Path(tempfile.gettempdir()) / "records-rendered-video")
    where.mkdir(mode=0o700, parents=True, exist_ok=True)  # the clips show patients: this process's alone
    return where


SUFFIXES = {MP4: ".mp4", WEBM: ".webm"}


def cache_path(cache_key: str, kind: str, limits: RenderLimits) -> Path:
    """Where the rendering of the stored file whose SHA-256 is `cache_key` as `kind` is kept: the format version
    and the media type are in the name, so a change to how clips are made leaves older files unused."""
    return cache_dir(limits) / f"{cache_key}-{FORMAT_VERSIONS[kind]}{SUFFIXES[kind]}"


def cached(cache_key: str, kind: str, limits: RenderLimits) -> Path | None:
    """The rendering as `kind` if it was made already, marked used now: its access time is the cache's clock
    (pruned least recently used first). Its modification time stays when it was made, since the answer's
    ETag and Last-Modified come from it: a <video> element resuming or seeking with `If-Range` gets its 206
    only while they stay what they were (touched on every use, each read would answer the whole clip)."""
    path = cache_path(cache_key, kind, limits)
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
        return path
    return None


def last_used(stat: os.stat_result) -> float:
    """When a cached rendering was last used: its access time (`cached` sets it), else when it was made."""
    return max(stat.st_atime, stat.st_mtime)


_making: dict[str, threading.Lock] = {}
_making_guard = threading.Lock()


def rendered_file(cache_key: str, kind: str, limits: RenderLimits, make: Callable[[Path], int]) -> Path:
    """The rendering as `kind` from the cache, or made now by `make` (which writes the file it is given and
    answers how many frames it holds). A <video> element sends its next Range requests before the first answer
    ends: they wait for the one rendering rather than start their own."""
    name = f"{cache_key}{SUFFIXES[kind]}"
    with _making_guard:
        lock = _making.setdefault(name, threading.Lock())
    try:
        with lock:
            return cached(cache_key, kind, limits) or _made(cache_key, kind, limits, make)
    finally:
        with _making_guard:
            if not lock.locked():
                _making.pop(name, None)


def mp4(c: Clip, limits: RenderLimits) -> Path:
    """The clip as an MP4 file (moov first), remuxed now unless the cache has it."""
    return rendered_file(c.cache_key, MP4, limits, lambda out: remux(c, out))


def _made(cache_key: str, kind: str, limits: RenderLimits, make: Callable[[Path], int]) -> Path:
    where = cache_dir(limits)
    target = cache_path(cache_key, kind, limits)
    descriptor, partial = tempfile.mkstemp(dir=where, suffix=".part")  # 0600
    os.close(descriptor)
    started = time.monotonic()
    try:
        frames = make(Path(partial))
        os.replace(partial, target)
    except OSError as exc:  # the cache's disk full or gone: the file can be made once there is room
        log.warning("records.video_cache_unwritable", error=type(exc).__name__)
        raise NotRendered(
            503,
            "no room to render this clip now (RECORDS_RENDER_VIDEO_CACHE_DIR); retry later or retrieve it as stored",
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    log.info(
        "records.video_rendered",
        media_type=kind,
        frames=frames,
        bytes=target.stat().st_size,
        seconds=round(time.monotonic() - started, 3),
    )
    prune(where, limits, keep=target)
    return target


def prune(where: Path, limits: RenderLimits, keep: Path) -> None:
    """Remove the least recently used renderings (MP4, WebM) over RECORDS_RENDER_VIDEO_CACHE_BYTES, those unused for
    RECORDS_RENDER_VIDEO_CACHE_SECONDS, and partial files a crashed remux left behind."""
    now = time.time()
    entries = []
    for path in where.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.suffix == ".part":
            if now - stat.st_mtime > 3600:
                path.unlink(missing_ok=True)
        elif path.suffix in SUFFIXES.values():
            entries.append((last_used(stat), stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for used, size, path in sorted(entries):
        if path == keep:
            continue
        if total > limits.video_cache_bytes or now - used > limits.video_cache_seconds:
            path.unlink(missing_ok=True)
            total -= size


# --- remuxing ------------------------------------------------------------------------------------


def remux(c: Clip, out_path: Path) -> int:
    """The clip's bitstream copied into an MP4 at `out_path`, packet by packet; the number of packets."""
    av = _pyav()  # FFmpeg's libraries are loaded when a clip is first rendered, not when the service starts
    try:
        order = _presentation_order(c)
        with (
            c.path.open("rb") as fp,
            av.open(Bitstream(fp, c.pixels_at), "r", format=DEMUXERS[c.syntax]) as source,
            av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as target,
        ):
            stream = source.streams.video[0]
            rate = frame_rate(stream.codec_context.framerate, c.header)
            out = target.add_stream_from_template(stream)
            if stream.codec_context.name == "hevc":
                out.codec_tag = "hvc1"  # the sample entry Safari plays HEVC from
            untimed = source.format.name in UNTIMED
            delay = max((k - shown for k, shown in enumerate(order)), default=0) if order else 0
            count = 0
            for packet in source.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end of stream
                if untimed:
                    shown = order[count] if order and count < len(order) else count
                    packet.time_base = 1 / rate
                    packet.dts, packet.pts, packet.duration = count - delay, shown, 1
                packet.stream = out
                target.mux(packet)
                count += 1
        if not count:
            raise NotRendered(406, _unreadable(c))
        return count
    except av.FFmpegError as exc:
        log.info("records.video_not_remuxed", syntax=str(c.syntax), error=type(exc).__name__)
        raise NotRendered(406, _unreadable(c)) from None


def _presentation_order(c: Clip) -> list[int] | None:
    """For each packet, in the order it is decoded, the place of its picture in the order pictures are shown;
    None when they are shown as decoded (no B-frames) or the stream carries its own timestamps. Found by
    decoding the clip once (the pictures are thrown away; the loop filter skipped)."""
    av = _pyav()

    with (
        c.path.open("rb") as fp,
        av.open(Bitstream(fp, c.pixels_at), "r", format=DEMUXERS[c.syntax]) as source,
    ):
        stream = source.streams.video[0]
        context = stream.codec_context
        if source.format.name not in UNTIMED or not context.has_b_frames:
            return None
        context.options = {"skip_loop_filter": "all"}
        shown: list[int] = []
        count = 0
        for packet in source.demux(stream):
            if packet.size:
                packet.pts = packet.dts = count
                count += 1
            shown += [int(frame.pts) for frame in _decoded(context, packet) if frame.pts is not None]
    if sorted(shown) != list(range(count)):
        log.info("records.video_order_unknown", packets=count, pictures=len(shown))
        return None  # a picture that did not decode: shown as decoded rather than not at all
    place = [0] * count
    for position, k in enumerate(shown):
        place[k] = position
    return place


def _decoded(context: Any, packet: Any) -> Iterator[Any]:
    import av

    try:
        yield from context.decode(packet if packet.size else None)
    except av.InvalidDataError:
        return  # a damaged picture: found missing by the caller


def _pyav() -> Any:
    """PyAV, or a 406 saying this deployment does not remux clips: it is the optional `video` extra (its wheels
    carry GPL code, so a deployment opts in)."""
    try:
        import av
    except ImportError:
        raise NotRendered(
            406,
            "this deployment does not render video (MP4, WebM: PyAV, the records service's optional `video` "
            "extra, is not installed); retrieve the clip as stored (application/dicom, or its bitstream or "
            "frames from .../frames/{n}), ask for image/gif (a cine stored as frames), or ask operations to "
            "install it",
        ) from None
    return av


def _unreadable(c: Clip) -> str:
    return (
        f"this clip's bitstream could not be read as {c.syntax.name}: nothing was rendered; retrieve it as "
        "stored (application/dicom, or its bitstream from .../frames/1)"
    )
