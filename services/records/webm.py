"""Clips and cine loops encoded as WebM (VP9), video a browser's <video> element plays (PS3.18 8.7.4, Table
8.7.4-1 "Video" names video/webm beside video/mp4):

- a video clip (video.py's `Clip`): its bitstream decoded and each picture re-encoded. For MPEG-2 (PS3.5 8.2.5,
  .100 to .103) this is the default rendering, since an MPEG-2 stream in an MP4 plays in no browser; for H.264
  and HEVC, which play remuxed, only when asked for;
- a cine stored as frames (an Ultrasound Multi-frame Image, native or JPEG, ...): each frame drawn exactly as
  `.../frames/{n}/rendered` draws it (rendering.py's `display_frame`: the VOI, palette and photometric handling),
  then encoded.

VP9 comes from libvpx (BSD-3-Clause) through PyAV, so nothing GPL is run. Encoding settings are for diagnostic
viewing: constant quality (`crf` 15 with `b:v 0`), 8-bit 4:2:0 (profile 0, which every browser decodes), a
keyframe every 2 s at most so a seek lands near where it asks, `deadline=realtime` with `cpu-used=6` and
`row-mt` on one thread (a 640x480 loop of 100 frames takes about 1 s of one core). VP9 4:2:0 wants even sizes
in browsers: an odd width or height is padded with one black column or row on the right or at the bottom (the
pixels keep their place and size; nothing is scaled). RGB pictures are converted with BT.601 coefficients in
limited range and the stream says so.

Encoding is bounded: frames x width x height at most RECORDS_RENDER_MAX_VIDEO_PIXELS (a 413), and at most
RECORDS_RENDER_VIDEO_ENCODES at a time in this process; a request waits RECORDS_RENDER_VIDEO_ENCODE_WAIT_SECONDS
for its turn, then is a 503 with Retry-After. The WebM is written to video.py's cache, once per stored file.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom.uid
import structlog
from pydicom.dataset import Dataset

from services.records.rendering import NotRendered, Rendering, RenderLimits, Source, display_frame
from services.records.video import (
    DEMUXERS,
    WEBM,
    Bitstream,
    Clip,
    _pyav,
    _unreadable,
    frame_rate,
    rendered_file,
)

log = structlog.get_logger(__name__)

MPEG2_SYNTAXES = set(pydicom.uid.MPEGTransferSyntaxes[:4])
CRF = 15
KEYFRAME_SECONDS = 2
ENCODER_OPTIONS = {
    "crf": str(CRF),
    "b": "0",  # with crf: constant quality, no bitrate target
    "deadline": "realtime",
    "cpu-used": "6",
    "row-mt": "1",
    "threads": "1",
    "lag-in-frames": "0",
}
BT601 = 6  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC_SMPTE170M
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG
UNSPECIFIED = 2


def check_clip(c: Clip, limits: RenderLimits) -> None:
    """A 413 when the clip is over the encoding limit by its header (its frames are counted again as decoded)."""
    rows, columns = int(c.header.get("Rows") or 0), int(c.header.get("Columns") or 0)
    _check_size(int(c.header.get("NumberOfFrames") or 0), columns, rows, limits)


def check_cine(src: Source, limits: RenderLimits) -> None:
    """A 406 for a single image, a 413 for a cine over the encoding limit."""
    if not src.is_multiframe:
        raise NotRendered(
            406,
            "this instance is a single image: it does not play as video/webm; ask for image/jpeg or image/png",
        )
    _check_size(src.frames, int(src.header.Columns), int(src.header.Rows), limits)


def webm_of_clip(c: Clip, limits: RenderLimits) -> Path:
    """The clip decoded and re-encoded as VP9 in a WebM, from the cache or made now."""
    check_clip(c, limits)
    return rendered_file(c.cache_key, WEBM, limits, lambda out: _encode_clip(c, out, limits))


def webm_of_cine(src: Source, cache_key: str, limits: RenderLimits) -> Path:
    """A cine stored as frames, each rendered as `.../frames/{n}/rendered` renders it, as VP9 in a WebM."""
    check_cine(src, limits)
    return rendered_file(cache_key, WEBM, limits, lambda out: _encode_cine(src, out, limits))


def cine_times(header: Dataset, count: int) -> list[Fraction]:
    """When each of `count` frames is shown, in seconds from the first (PS3.3 C.7.6.5 Cine Module): Frame Time
    Vector (each the time from the frame before; used when it has one positive value a frame after the first),
    Frame Time, Cine Rate, Recommended Display Frame Rate; else 25 frames a second."""
    vector = header.get("FrameTimeVector")
    if vector is not None and count > 1 and len(vector) == count:
        steps = [Fraction(str(v)) / 1000 for v in list(vector)[1:]]
        if all(s > 0 for s in steps):
            times = [Fraction(0)]
            for step in steps:
                times.append(times[-1] + step)
            return times
    step = 1 / _cine_rate(header)
    return [k * step for k in range(count)]


def _cine_rate(header: Dataset) -> Fraction:
    if header.get("FrameTime") and float(header.FrameTime) > 0:
        return (1000 / Fraction(str(header.FrameTime))).limit_denominator(1001)
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        if header.get(keyword) and float(header.get(keyword)) > 0:
            return Fraction(str(header.get(keyword))).limit_denominator(1001)
    return Fraction(25)


def _check_size(frames: int, width: int, height: int, limits: RenderLimits) -> None:
    if frames * width * height > limits.max_video_pixels:
        raise NotRendered(
            413,
            f"{frames} frames of {width}x{height} are over the {limits.max_video_pixels} pixels a video may be "
            "encoded from (RECORDS_RENDER_MAX_VIDEO_PIXELS); retrieve the clip or its frames as stored, or ask "
            "operations to raise the limit",
        )


# --- encoding --------------------------------------------------------------------------------------

_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_guard = threading.Lock()


@contextlib.contextmanager
def encoding_slot(limits: RenderLimits) -> Iterator[None]:
    """One of RECORDS_RENDER_VIDEO_ENCODES encodes at a time: a burst of requests for new clips cannot take
    every core from the service. A request waits its turn RECORDS_RENDER_VIDEO_ENCODE_WAIT_SECONDS, then is a
    503 with Retry-After."""
    with _slots_guard:
        slots = _slots.setdefault(limits.video_encodes, threading.BoundedSemaphore(limits.video_encodes))
    if not slots.acquire(timeout=limits.video_encode_wait_seconds):
        log.info("records.video_encode_busy", encodes=limits.video_encodes)
        retry = max(5, math.ceil(limits.video_encode_wait_seconds))
        raise NotRendered(
            503,
            f"other clips are being encoded as video now (RECORDS_RENDER_VIDEO_ENCODES={limits.video_encodes}); "
            f"retry in {retry} s, or retrieve this one as stored",
            headers={"Retry-After": str(retry)},
        )
    try:
        yield
    finally:
        slots.release()


def _encode_clip(c: Clip, out_path: Path, limits: RenderLimits) -> int:
    """Each picture of the clip, in the order shown, re-encoded; timed by the bitstream's own rate (else the
    instance's), one picture after the other as the remuxed MP4 times them."""
    av = _pyav()
    with encoding_slot(limits):
        try:
            with (
                c.path.open("rb") as fp,
                av.open(Bitstream(fp, c.pixels_at), "r", format=DEMUXERS[c.syntax]) as source,
            ):
                stream = source.streams.video[0]
                context = stream.codec_context
                rate = frame_rate(context.framerate, c.header)
                colour = (context.colorspace, context.color_primaries, context.color_trc, context.color_range)
                pictures = (frame for frame in source.decode(stream))
                count = _write(out_path, pictures, rate, colour, limits)
        except av.FFmpegError as exc:
            log.info("records.video_not_encoded", syntax=str(c.syntax), error=type(exc).__name__)
            raise NotRendered(406, _unreadable(c)) from None
    if not count:
        raise NotRendered(406, _unreadable(c))
    return count


def _encode_cine(src: Source, out_path: Path, limits: RenderLimits) -> int:
    times = cine_times(src.header, src.frames)
    av = _pyav()
    with encoding_slot(limits):
        pictures = (
            av.VideoFrame.from_ndarray(_rgb(display_frame(src, n, Rendering())), format="rgb24")
            for n in range(1, src.frames + 1)
        )
        try:
            return _write(out_path, pictures, None, (BT601, BT601, BT601, LIMITED_RANGE), limits, times)
        except av.FFmpegError as exc:
            log.info("records.video_not_encoded", error=type(exc).__name__)
            raise NotRendered(406, "this cine could not be encoded as video; ask for image/gif") from None


def _rgb(image: Any) -> npt.NDArray[np.uint8]:
    return np.asarray(image.convert("RGB"))


def _write(
    out_path: Path,
    pictures: Iterator[Any],
    rate: Fraction | None,
    colour: tuple[int, int, int, int],
    limits: RenderLimits,
    times: list[Fraction] | None = None,
) -> int:
    """The pictures encoded into a WebM at `out_path`: picture k at k / rate, or at times[k] (seconds) when
    the frames are not evenly spaced; the number of pictures written."""
    av = _pyav()
    first = next(pictures, None)
    if first is None:
        return 0
    width, height = first.width + first.width % 2, first.height + first.height % 2
    if (width, height) != (first.width, first.height):
        # Padded pictures go through RGB (`_even`), which the encoder converts as BT.601 limited range,
        # whatever the source's own colour tags said (BT.709 for an HD clip): say what the pictures are.
        colour = (BT601, BT601, BT601, LIMITED_RANGE)
    if times is not None:
        time_base = Fraction(1, 1000)
        span = times[-1] if len(times) > 1 else Fraction(1)
        fps = (len(times) - 1) / span if len(times) > 1 and span else Fraction(25)
    else:
        assert rate is not None
        time_base, fps = 1 / rate, rate
    with av.open(str(out_path), "w", format="webm") as target:
        stream = target.add_stream("libvpx-vp9", rate=fps.limit_denominator(1001))
        context = stream.codec_context
        context.time_base = time_base
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        space, primaries, trc, colour_range = colour
        if space != UNSPECIFIED:
            context.colorspace, context.color_primaries, context.color_trc = space, primaries, trc
        context.color_range = colour_range or LIMITED_RANGE
        stream.options = {**ENCODER_OPTIONS, "g": str(max(1, round(KEYFRAME_SECONDS * fps)))}
        count = 0
        picture = first
        while picture is not None:
            if (count + 1) * width * height > limits.max_video_pixels:  # a clip longer than its header says
                _check_size(count + 1, width, height, limits)
            frame = _even(picture, width, height)
            frame.pts = round(times[count] / time_base) if times is not None else count
            frame.time_base = time_base
            for packet in stream.encode(frame):
                target.mux(packet)
            count += 1
            picture = next(pictures, None)
        for packet in stream.encode():
            target.mux(packet)
    return count


def _even(picture: Any, width: int, height: int) -> Any:
    """The picture padded to `width` x `height` (one black column or row more when its size is odd)."""
    av = _pyav()
    if (picture.width, picture.height) == (width, height):
        return picture
    rgb = picture.to_ndarray(format="rgb24")
    padded = np.zeros((height, width, 3), np.uint8)
    padded[: rgb.shape[0], : rgb.shape[1]] = rgb
    return av.VideoFrame.from_ndarray(padded, format="rgb24")
