"""Images rendered on the server (PS3.18 8.3.5, 8.7.4): a stored frame through the grayscale or colour
pipeline of PS3.4 N.2 to 8-bit display values, cut to a source region and scaled to a viewport, then encoded
as JPEG, PNG or GIF (several frames: an animated GIF timed by the instance's frame timing).

One frame is decoded at a time (pydicom reads that frame alone from the file), and every size is bounded
(`RenderLimits`). pydicom's decoder plugins decode it: its own for native and RLE frames, Pillow for JPEG
Baseline/Extended and JPEG 2000, pyjpegls for JPEG-LS, GDCM (python-gdcm) for JPEG Lossless (process 14, SV1 or
any predictor: 1.2.840.10008.1.2.4.57 and .70), which nothing else installed here reads. What cannot be
rendered is a `NotRendered` carrying the HTTP status and what to do instead:

    NotRendered
      + 400  a rendering parameter that does not parse (the detail names it and its form)
      + 406  nothing to render as an image (a report, a video clip, a transfer syntax with no decoder here)
      + 413  a frame, a viewport, an animation or a video to encode over the limits
      + 503  no room in the video cache, or every video encoder busy (with Retry-After)
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.pixels
import pydicom.uid
from PIL import Image
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.dataset import Dataset

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
RENDERED_TYPES = (JPEG, PNG, GIF)  # the first is the default (PS3.18 Table 8.7.4-1)
VIDEO_SYNTAXES = set(pydicom.uid.MPEGTransferSyntaxes)
# pydicom tries GDCM first wherever it has it. It is here for JPEG Lossless alone: for these syntaxes it goes
# last, so the decoders that read them before it came still do (GDCM only where they fail).
DECODED_BEFORE_GDCM = (
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
)
GDCM_PLUGIN = ("pydicom.pixels.decoders.gdcm", "_decode_frame")


def put_gdcm_last() -> None:
    """Move GDCM behind the other available plugins of `DECODED_BEFORE_GDCM` (run once, at import: pydicom's
    plugin lists are not thread-safe)."""
    for syntax in DECODED_BEFORE_GDCM:
        decoder = pydicom.pixels.get_decoder(syntax)
        if "gdcm" in decoder.available_plugins and len(decoder.available_plugins) > 1:
            decoder.remove_plugin("gdcm")
            decoder.add_plugin("gdcm", GDCM_PLUGIN)


put_gdcm_last()


class RenderLimits(BaseSettings):
    """`RECORDS_RENDER_*`: how large a rendering may be. A frame is decoded whole, so its size bounds memory."""

    model_config = SettingsConfigDict(env_prefix="RECORDS_RENDER_", extra="ignore")

    max_frame_pixels: int = 4096 * 4096  # Rows x Columns of the stored frame
    max_viewport_pixels: int = 4096 * 4096  # vw x vh of the answer
    max_animation_pixels: int = 64 * 1024**2  # frames x width x height of an animated GIF
    default_quality: int = 90
    thumbnail_size: int = 128  # a thumbnail fits in this square unless a viewport is given
    # Video encoded as WebM (webm.py): frames x width x height of one clip or cine at most, and how many are
    # encoded at a time in this process (a request waits this long for its turn, then is a 503).
    max_video_pixels: int = 1024**3  # about 100 s of 720x576; 640x480x100 frames take ~1 s of a core
    video_encodes: int = 1
    video_encode_wait_seconds: float = 30
    # Video clips remuxed to MP4 (video.py) and encoded as WebM are kept on local disk, as long and as much as
    # this allows.
    video_cache_dir: str = ""  # default: {tempdir}/records-rendered-video
    video_cache_bytes: int = 512 * 1024**2  # the k8s base mounts /tmp as a 1 GiB emptyDir
    video_cache_seconds: int = 24 * 3600


@lru_cache
def get_render_limits() -> RenderLimits:
    return RenderLimits()


class NotRendered(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers  # Retry-After of a 503


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"  # linear | linear-exact | sigmoid (PS3.3 C.11.2.1.2.1, VOI LUT Function)


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    region: tuple[int, int, int | None, int | None] = (0, 0, None, None)  # sx, sy, sw, sh


@dataclass(frozen=True)
class Rendering:
    """How to render: what PS3.18 8.3.5.1's parameters (or WADO-URI's) asked for."""

    media_type: str = JPEG
    quality: int | None = None
    window: Window | None = None
    viewport: Viewport | None = None
    fraction: tuple[float, float, float, float] | None = None  # WADO-URI region: x1, y1, x2, y2 in 0..1
    crop_to_regions: bool = False  # a thumbnail: the ultrasound regions only, no burned-in text around them


NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
FUNCTIONS = {
    "linear": "linear",
    "linear-exact": "linear-exact",
    "linear_exact": "linear-exact",
    "sigmoid": "sigmoid",
}


def parse_window(value: str | None) -> Window | None:
    """`window=center,width[,function]` (PS3.18 8.3.5.1.4)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3) or not all(re.fullmatch(NUMBER, p) for p in parts[:2]):
        raise NotRendered(
            400,
            "window is center,width[,function]: two numbers and linear, linear-exact or sigmoid, "
            "e.g. window=40,400,linear",
        )
    function = FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else "linear"
    if function is None:
        raise NotRendered(400, "the window function is linear, linear-exact or sigmoid")
    return window(float(parts[0]), float(parts[1]), function)


def window(center: float, width: float, function: str = "linear") -> Window:
    if (
        not (math.isfinite(center) and math.isfinite(width))
        or width <= 0
        or (function == "linear" and width < 1)
    ):
        raise NotRendered(
            400,
            "the window width is at least 1 (above 0 for linear-exact and sigmoid), and both numbers finite",
        )
    return Window(center, width, function)


def parse_viewport(value: str | None) -> Viewport | None:
    """`viewport=vw,vh[,sx,sy,sw,sh]` (PS3.18 8.3.5.1.3): the answer's width and height, and the source region
    (its top left corner and size in pixels of the image; a negative size flips it)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 6) or not all(re.fullmatch(r"[+-]?[0-9]{1,6}", p) for p in parts if p):
        raise NotRendered(
            400,
            "viewport is vw,vh or vw,vh,sx,sy,sw,sh in whole pixels, e.g. viewport=256,256 or "
            "viewport=256,256,0,0,64,64",
        )
    if not parts[0] or not parts[1] or int(parts[0]) <= 0 or int(parts[1]) <= 0:
        raise NotRendered(400, "the viewport's width and height (vw, vh) are whole numbers above 0")
    region: tuple[int, int, int | None, int | None] = (0, 0, None, None)
    if len(parts) == 6:
        sx, sy = int(parts[2] or 0), int(parts[3] or 0)
        sw, sh = (int(p) if p else None for p in parts[4:])
        if sx < 0 or sy < 0 or sw == 0 or sh == 0:
            raise NotRendered(400, "the viewport's source region starts at sx,sy >= 0 and sw, sh are not 0")
        region = (sx, sy, sw, sh)
    return Viewport(int(parts[0]), int(parts[1]), region)


def parse_quality(value: str | None) -> int | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,3}", value.strip()) or not 1 <= int(value) <= 100:
        raise NotRendered(400, "quality is a whole number from 1 to 100 (PS3.18 8.3.5.1.2)")
    return int(value)


def refuse_annotation(value: str | None) -> None:
    if value is not None:
        raise NotRendered(
            400,
            "annotation is not supported: images are rendered without burned-in text; leave annotation out",
        )


# --- what a stored instance is, from its header --------------------------------------------------


@dataclass(frozen=True)
class Source:
    path: Path
    header: Dataset
    frames: int

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1


def source(path: Path, limits: RenderLimits) -> Source:
    """The instance's header, checked for being renderable here (before any pixel is decoded)."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = pydicom.uid.UID(
        str(header.file_meta.get("TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian)
    )
    if "Rows" not in header or "Columns" not in header:
        raise NotRendered(
            406,
            "this instance is not an image (a report or a structured report): retrieve it as application/dicom",
        )
    if syntax in VIDEO_SYNTAXES:
        raise NotRendered(
            406,
            f"this instance is a video clip ({syntax.name}): it renders whole as video (video/webm or "
            "video/mp4), not as an image; ask .../instances/{uid}/rendered with Accept: video/webm or video/mp4",
        )
    if not decodable(syntax):
        raise NotRendered(
            406,
            f"no decoder here for {syntax.name} pixel data: retrieve the frames as stored "
            "(.../frames/{n}, or the instance as application/dicom) and render them in the viewer",
        )
    pixels = int(header.Rows) * int(header.Columns)
    if pixels > limits.max_frame_pixels:
        raise NotRendered(
            413,
            f"a frame of this instance is {header.Columns}x{header.Rows} pixels, over the "
            f"{limits.max_frame_pixels} a rendering may decode (RECORDS_RENDER_MAX_FRAME_PIXELS); retrieve the "
            "frames as stored instead",
        )
    return Source(path, header, int(header.get("NumberOfFrames") or 1))


def decodable(syntax: pydicom.uid.UID) -> bool:
    """Whether a decoder installed here takes pixel data in `syntax`: false for a syntax pydicom has no decoder
    for at all (JPEG XL, JPIP, encapsulated uncompressed, a private one) as for one whose plugins are missing."""
    try:
        return pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        return False


def check_frames(src: Source, numbers: Iterable[int]) -> None:
    if any(n < 1 or n > src.frames for n in numbers):
        raise NotRendered(404, f"this instance has {src.frames} frame(s); ask for 1 to {src.frames}")


# --- one frame to display values -------------------------------------------------------------------


def display_frame(src: Source, number: int, rendering: Rendering) -> Image.Image:
    """Frame `number` (1-based) as 8-bit grey or RGB, windowed, cut and scaled as `rendering` says."""
    decoded = Dataset()
    try:
        array = pydicom.pixels.pixel_array(str(src.path), index=number - 1, ds_out=decoded)
    except Exception as exc:  # a decoder's own error types differ per plugin
        raise NotRendered(
            406,
            f"the stored pixel data of this instance could not be decoded ({type(exc).__name__}); retrieve the "
            "instance or its frames as stored",
        ) from None
    photometric = str(decoded.get("PhotometricInterpretation") or src.header.get("PhotometricInterpretation"))
    if photometric == "PALETTE COLOR":
        descriptor = src.header.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        values = _eight_bit(pydicom.pixels.apply_color_lut(array, src.header), int(descriptor[2]))
    elif array.ndim == 3:  # RGB (YBR was converted by pydicom as it decoded)
        values = _eight_bit(array, int(src.header.get("BitsStored") or 8))
    else:
        values = _grey(array, src.header, rendering.window)
        if photometric == "MONOCHROME1":
            values = 255 - values
    image = Image.fromarray(values)
    return _fit(_region(image, src.header, rendering), rendering.viewport, rendering)


def _eight_bit(array: npt.NDArray[np.generic], bits: int | None = None) -> npt.NDArray[np.uint8]:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    top = float((1 << bits) - 1) if bits else float(max(int(np.max(array)), 1))
    return np.rint(np.clip(array.astype(np.float32) / top, 0, 1) * 255).astype(np.uint8)


def _grey(array: npt.NDArray[np.generic], header: Dataset, asked: Window | None) -> npt.NDArray[np.uint8]:
    """Modality LUT (or rescale), then the VOI: the window asked for, else the instance's VOI LUT or window
    (with its VOI LUT Function), else the values' natural range (PS3.4 N.2.1)."""
    values = pydicom.pixels.apply_modality_lut(array, header).astype(np.float64)
    if asked is not None:
        return _windowed(values, asked)
    if "VOILUTSequence" in header:
        lut = pydicom.pixels.apply_voi_lut(values.astype(np.int64), header, prefer_lut=True)
        descriptor = header.VOILUTSequence[0].LUTDescriptor
        top = float((1 << int(descriptor[2])) - 1)
        return np.rint(np.clip(lut.astype(np.float64) / top, 0, 1) * 255).astype(np.uint8)
    centers, widths = header.get("WindowCenter"), header.get("WindowWidth")
    if centers is not None and widths is not None:
        center = float(centers[0] if isinstance(centers, pydicom.multival.MultiValue) else centers)
        width = float(widths[0] if isinstance(widths, pydicom.multival.MultiValue) else widths)
        function = str(header.get("VOILUTFunction") or "LINEAR").lower().replace("_", "-")
        if width > 0 and function in FUNCTIONS:
            return _windowed(
                values, Window(center, max(width, 1.0) if function == "linear" else width, function)
            )
    rescaled = "RescaleSlope" in header or "ModalityLUTSequence" in header
    if (
        int(header.get("BitsStored") or 8) <= 8
        and not rescaled
        and int(header.get("PixelRepresentation") or 0) == 0
    ):
        return values.clip(0, 255).astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    return _windowed(values, Window((low + high) / 2, max(high - low, 1.0), "linear-exact"))


def _windowed(x: npt.NDArray[np.float64], w: Window) -> npt.NDArray[np.uint8]:
    """PS3.3 C.11.2.1.2.1 and C.11.2.1.3.1 to output values 0..255."""
    if w.function == "sigmoid":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - w.center) / w.width))
    elif w.function == "linear-exact":
        y = np.clip((x - w.center) / w.width + 0.5, 0, 1) * 255.0
    elif w.width <= 1:
        y = np.where(x <= w.center - 0.5, 0.0, 255.0)
    else:
        y = np.clip((x - (w.center - 0.5)) / (w.width - 1) + 0.5, 0, 1) * 255.0
    return np.rint(y).astype(np.uint8)


NO_TEXT_FREE_BOX = (
    "no thumbnail without burned-in text: Burned In Annotation is not NO and no Sequence of Ultrasound Regions "
    "says where the image is (a thumbnail carries no patient identification, PS3.18 10.4.3.3.4)"
)


def text_free_box(header: Dataset) -> tuple[int, int, int, int] | None:
    """Where a frame holds no burned-in text: all of it when Burned In Annotation is NO, else the box around its
    ultrasound regions (the scanner writes the patient's name and the date outside them); None when neither
    says."""
    columns, rows = int(header.Columns), int(header.Rows)
    if str(header.get("BurnedInAnnotation") or "").upper() == "NO":
        return (0, 0, columns, rows)
    boxes = [
        [r.get(f"RegionLocation{c}") for c in ("MinX0", "MinY0", "MaxX1", "MaxY1")]
        for r in header.get("SequenceOfUltrasoundRegions") or []
    ]
    found = [[int(v) for v in b] for b in boxes if None not in b]
    if not found:
        return None
    left, top = max(0, min(b[0] for b in found)), max(0, min(b[1] for b in found))
    right, bottom = min(columns, max(b[2] for b in found) + 1), min(rows, max(b[3] for b in found) + 1)
    return (left, top, right, bottom) if right > left and bottom > top else None


def _region(image: Image.Image, header: Dataset, rendering: Rendering) -> Image.Image:
    """The source region: a thumbnail's ultrasound regions, WADO-URI's `region`, the viewport's sx,sy,sw,sh."""
    if rendering.crop_to_regions:
        box = text_free_box(header)
        if box is None:
            raise NotRendered(406, NO_TEXT_FREE_BOX)
        if box != (0, 0, *image.size):
            image = image.crop(box)
    if rendering.fraction is not None:
        x1, y1, x2, y2 = rendering.fraction
        w, h = image.size
        image = image.crop((round(x1 * w), round(y1 * h), max(round(x2 * w), 1), max(round(y2 * h), 1)))
    if rendering.viewport is not None:
        sx, sy, sw, sh = rendering.viewport.region
        w, h = image.size
        sw = w - sx if sw is None else sw
        sh = h - sy if sh is None else sh
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        left, top, right, bottom = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
        if right <= left or bottom <= top:
            raise NotRendered(400, f"the viewport's source region lies outside the {w}x{h} image")
        image = image.crop((left, top, right, bottom))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _fit(image: Image.Image, viewport: Viewport | None, rendering: Rendering) -> Image.Image:
    """Scaled to fit the viewport, aspect ratio kept (the answer is no larger than vw x vh)."""
    if viewport is None:
        return image
    w, h = image.size
    scale = min(viewport.width / w, viewport.height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)


def check_viewport(viewport: Viewport | None, limits: RenderLimits) -> None:
    if viewport is not None and viewport.width * viewport.height > limits.max_viewport_pixels:
        raise NotRendered(
            413,
            f"a viewport of {viewport.width}x{viewport.height} is over the {limits.max_viewport_pixels} pixels an "
            "answer may have (RECORDS_RENDER_MAX_VIEWPORT_PIXELS); ask for a smaller one",
        )


# --- encoding --------------------------------------------------------------------------------------


def encode(image: Image.Image, rendering: Rendering, limits: RenderLimits) -> bytes:
    buffer = io.BytesIO()
    if rendering.media_type == PNG:
        image.save(buffer, format="PNG")
    elif rendering.media_type == GIF:
        _gif_frame(image).save(buffer, format="GIF")
    else:
        quality = rendering.quality or limits.default_quality
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _gif_frame(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else image.convert("P", palette=Image.Palette.ADAPTIVE)


def frame_durations(header: Dataset, count: int) -> list[int]:
    """Milliseconds each frame shows (PS3.3 C.7.6.5 Cine Module): Frame Time, Frame Time Vector (the time from
    the previous frame), Cine Rate or Recommended Display Frame Rate; 100 ms when none is given."""
    vector = header.get("FrameTimeVector")
    if vector is not None and len(vector) == count and count > 1:
        steps = [float(v) for v in list(vector)[1:]]
        return [max(10, round(s)) for s in steps] + [max(10, round(sum(steps) / len(steps)))]
    if header.get("FrameTime"):
        return [max(10, round(float(header.FrameTime)))] * count
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        if header.get(keyword):
            return [max(10, round(1000 / float(header.get(keyword))))] * count
    return [100] * count


def render(src: Source, numbers: list[int], rendering: Rendering, limits: RenderLimits) -> bytes:
    """The frames `numbers` as one image: one frame as JPEG, PNG or GIF; several as an animated GIF."""
    check_frames(src, numbers)
    check_viewport(rendering.viewport, limits)
    if len(numbers) == 1:
        return encode(display_frame(src, numbers[0], rendering), rendering, limits)
    if rendering.media_type != GIF:
        raise NotRendered(
            406,
            f"{len(numbers)} frames are one image only as an animated image/gif: ask for image/gif, or for "
            f"one frame at a time as {rendering.media_type}",
        )
    first = display_frame(src, numbers[0], rendering)
    if first.width * first.height * len(numbers) > limits.max_animation_pixels:
        raise NotRendered(
            413,
            f"{len(numbers)} frames of {first.width}x{first.height} are over the {limits.max_animation_pixels} "
            "pixels an animation may have (RECORDS_RENDER_MAX_ANIMATION_PIXELS); ask with a smaller viewport "
            "(viewport=256,256) or for fewer frames",
        )
    frames = [_gif_frame(first)]
    for number in numbers[1:]:
        frames.append(_gif_frame(display_frame(src, number, rendering)))
    all_durations = frame_durations(src.header, src.frames)
    durations = [all_durations[n - 1] for n in numbers]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()
