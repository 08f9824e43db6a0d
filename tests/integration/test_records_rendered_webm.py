"""Ultrasound video a browser plays as WebM (VP9): an MPEG-2 clip (which no browser plays from an MP4) by
default, a cine stored as frames (uncompressed RGB, JPEG Baseline) on request, through WADO-RS `/rendered` and
WADO-URI. Real clips encoded with PyAV, stored through STOW-RS into the real records service, and each answer
opened with PyAV as a browser's demuxer opens it: codec, profile, size, frame count, timing, and pictures
compared with what the stored stream decodes to or what `.../frames/{n}/rendered` draws (PSNR)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest
import requests
from PIL import Image
from sqlalchemy.engine import Engine

from services.common.config import Settings
from services.records import webm
from services.records.rendering import RenderLimits, get_render_limits
from services.records.video import cache_dir
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import instances, new_study, serving
from tests.integration.test_records_rendered import (  # noqa: F401 - the fixtures
    BASE,
    _base,
    base_url,
    engine,
    stored,
    url_of,
    wado_params,
)
from tests.integration.test_records_rendered_video import h264_instance, h264_stream
from tests.keys import operations_headers

Picture = npt.NDArray[np.uint8]
# Luma (BT.601 Y) within 38 dB of the source: visually lossless for review, and far above a picture out of place
# or a wrong colour matrix (~15-25 dB). Colour is compared in RGB at 30 dB: 4:2:0 (VP9 profile 0, which every
# browser plays) halves the chroma resolution, and on these small test frames with hard-edged flow patches
# that alone (RGB -> yuv420p -> RGB, no encoder) caps RGB PSNR at 32.6 dB.
MIN_LUMA_PSNR, MIN_RGB_PSNR = 38.0, 30.0


def scene(i: int, width: int, height: int) -> Picture:
    """Frame i of a synthetic Doppler loop: a smooth grey sector, a bright wall moving right 2 px a frame, a
    red and a blue flow patch (colour Doppler, what a 256-colour GIF bands)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    grey = 40 + 120 * (y / height) + 30 * np.sin(x / 7 + i / 3)
    picture = np.repeat(grey[..., None], 3, axis=2)
    picture[:, (2 * i) % width : (2 * i) % width + 4] = 230
    flow = (x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 5) ** 2
    picture[flow] = [200, 40 + 2 * i % 60, 30]
    back = (x - 2 * width / 3) ** 2 + (y - height / 2) ** 2 < (height / 6) ** 2
    picture[back] = [30, 60, 210]
    return np.clip(picture, 0, 255).astype(np.uint8)


def psnr(a: Picture, b: Picture) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def luma(picture: Picture) -> npt.NDArray[np.float64]:
    return picture.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def close(shown: Picture, expected: Picture) -> bool:
    """The picture as the source shows it: its luma within MIN_LUMA_PSNR, its colours within MIN_RGB_PSNR."""
    return psnr(luma(shown), luma(expected)) >= MIN_LUMA_PSNR and psnr(shown, expected) >= MIN_RGB_PSNR


def decoded(data: bytes, format: str | None = None) -> list[Picture]:
    with av.open(io.BytesIO(data), "r", format=format) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def webm_facts(data: bytes) -> tuple[str, str, str, int, int, list[float], list[float]]:
    """Container, codec, profile, width, height, when each picture is shown (s) and where keyframes are (s)."""
    with av.open(io.BytesIO(data), "r") as container:
        video = container.streams.video[0]
        facts = (container.format.name, video.codec_context.name, str(video.codec_context.profile))
        size = (video.codec_context.width, video.codec_context.height)
        keyframes = [float(p.pts * p.time_base) for p in container.demux(video) if p.size and p.is_keyframe]
    with av.open(io.BytesIO(data), "r") as container:
        times = [float(frame.time) for frame in container.decode(video=0)]
    return (*facts, *size, times, keyframes)


def mpeg2_stream(frames: int, rate: int, width: int, height: int) -> bytes:
    """An MPEG-2 Main Profile elementary stream with B-frames, as older ultrasound carts record clips."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpeg2video") as out:
        stream = out.add_stream("mpeg2video", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.max_b_frames = 2
        stream.codec_context.gop_size = 12
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(scene(i, width, height), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def mpeg2_instance(study: str, stream: bytes, frames: int, width: int, height: int) -> pydicom.Dataset:
    ds = h264_instance(study, stream)
    ds.Rows, ds.Columns, ds.NumberOfFrames = height, width, frames
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    return ds


def rgb_cine(study: str, frames: int, width: int, height: int, frame_time: float) -> pydicom.Dataset:
    ds = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(
                None, study_uid=study, series_uid=study + ".2", frames=frames, rows=height, cols=width
            )
        )
    )
    ds.PixelData = np.stack([scene(i, width, height) for i in range(frames)]).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.FrameTime, ds.FrameIncrementPointer = frame_time, pydicom.tag.Tag("FrameTime")
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def jpeg_cine(study: str, frames: int, width: int, height: int, frame_time: float) -> pydicom.Dataset:
    """The same cine as most carts send it: JPEG Baseline, YBR_FULL_422, one fragment a frame."""
    ds = rgb_cine(study, frames, width, height, frame_time)
    encoded = []
    for i in range(frames):
        buffer = io.BytesIO()
        Image.fromarray(scene(i, width, height)).save(buffer, format="JPEG", quality=95, subsampling=1)
        encoded.append(buffer.getvalue())
    ds.PixelData = pydicom.encaps.encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def cached_webm() -> list[Path]:
    return sorted(cache_dir(get_render_limits()).glob("*.webm"))


def test_an_mpeg2_clip_plays_as_webm_by_default_and_still_remuxes_to_mp4_on_request(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    frames, rate, width, height = 60, 25, 160, 120
    stream = mpeg2_stream(frames, rate, width, height)
    study = new_study()
    clip = mpeg2_instance(study, stream, frames, width, height)
    case_id, _ = stored(engine, settings, clip)
    headers = operations_headers(settings)
    rendered = f"{url_of(case_id, clip)}/rendered"

    got = requests.get(rendered, headers={"Accept": "*/*", **headers}, timeout=60)  # what <video src> sends
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "video/webm" and got.headers["accept-ranges"] == "bytes"
    container, codec, profile, w, h, times, keyframes = webm_facts(got.content)
    assert (container, codec, profile, w, h) == ("matroska,webm", "vp9", "Profile 0", width, height)
    assert len(times) == frames and all(abs(t - i / rate) < 1e-3 for i, t in enumerate(times))
    ends = [*keyframes[1:], frames / rate]  # a seek lands on a keyframe at most 2 s before where it asks
    assert keyframes[0] == 0 and len(keyframes) >= 2
    assert all(b - a <= 2.0 for a, b in zip(keyframes, ends, strict=True))
    source = decoded(stream, "mpeg2video")
    shown = decoded(got.content)
    assert len(source) == len(shown) == frames
    # Each picture in its place (one out of order, a B-frame shown late, would be ~15 dB off).
    assert all(close(a, b) for a, b in zip(shown, source, strict=True))

    for accept in ({"Accept": "video/*"}, {}):  # no Accept header at all: */*
        again = requests.get(rendered, headers={**accept, **headers}, timeout=60)
        assert again.headers["content-type"] == "video/webm" and again.content == got.content
    mp4 = requests.get(rendered, headers={"Accept": "video/mp4", **headers}, timeout=60)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content), "r") as remuxed:
        assert remuxed.streams.video[0].codec_context.name == "mpeg2video"
    assert all(np.array_equal(a, b) for a, b in zip(decoded(mp4.content), source, strict=True))
    param = requests.get(rendered, params={"accept": "video/mp4"}, headers=headers, timeout=60)
    assert param.headers["content-type"] == "video/mp4" and param.content == mp4.content
    wado = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(clip, contentType="video/webm"),
        headers=headers,
        timeout=60,
    )
    assert wado.status_code == 200 and wado.content == got.content


def test_an_h264_clip_stays_an_mp4_by_default_and_is_a_webm_when_asked(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    clip = h264_instance(study, h264_stream())  # 30 frames of 64x48 at 20/s with B-frames
    case_id, _ = stored(engine, settings, clip)
    headers = operations_headers(settings)
    rendered = f"{url_of(case_id, clip)}/rendered"
    default = requests.get(rendered, headers=headers, timeout=60)
    assert default.headers["content-type"] == "video/mp4"
    got = requests.get(rendered, headers={"Accept": "video/webm", **headers}, timeout=60)
    assert got.status_code == 200 and got.headers["content-type"] == "video/webm"
    _, codec, _, w, h, times, _ = webm_facts(got.content)
    assert (codec, w, h, len(times)) == ("vp9", 64, 48, 30)
    bars = [int((frame[24, :, 0] > 110).sum()) for frame in decoded(got.content)]
    assert bars == [2 * i for i in range(30)]  # the pictures in the order shown, not decoded


def test_a_cine_stored_as_frames_plays_as_webm_when_asked_its_frames_as_rendered_and_timed(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    """An RGB cine of odd width (padded by one black column) and a JPEG Baseline one: each WebM picture is the
    PNG `.../frames/{n}/rendered` draws, at the time its Frame Time says; the default stays JPEG."""
    study = new_study()
    frames, width, height = 24, 121, 90
    rgb = rgb_cine(study, frames, width, height, frame_time=50.0)  # 20 frames a second
    jpeg = jpeg_cine(study, 12, 128, 96, frame_time=33.3)
    single = instances(study)[0]
    case_id, _ = stored(engine, settings, rgb, jpeg, single)
    headers = operations_headers(settings)

    for cine, count, size, step in ((rgb, frames, (width + 1, height), 0.05), (jpeg, 12, (128, 96), 0.0333)):
        got = requests.get(
            f"{url_of(case_id, cine)}/rendered", headers={"Accept": "video/webm", **headers}, timeout=60
        )
        assert got.status_code == 200 and got.headers["content-type"] == "video/webm", got.text
        _, codec, profile, w, h, times, _ = webm_facts(got.content)
        assert (codec, profile, (w, h), len(times)) == ("vp9", "Profile 0", size, count)
        assert all(abs(t - k * step) <= 0.001 * k + 0.001 for k, t in enumerate(times))  # ms timestamps
        shown = decoded(got.content)
        for n in (1, count // 2, count):
            png = requests.get(
                f"{url_of(case_id, cine)}/frames/{n}/rendered",
                headers={"Accept": "image/png", **headers},
                timeout=30,
            )
            expected = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
            picture = shown[n - 1]
            assert close(picture[: expected.shape[0], : expected.shape[1]], expected), n
            assert (picture[:, expected.shape[1] :] < 24).all()  # the padding column: black
        param = requests.get(
            f"{url_of(case_id, cine)}/rendered", params={"accept": "video/webm"}, headers=headers, timeout=60
        )
        assert param.content == got.content
        wado = requests.get(
            f"{BASE[0]}/dicomweb/wado",
            params=wado_params(cine, contentType="video/webm"),
            headers=headers,
            timeout=60,
        )
        assert wado.status_code == 200 and wado.content == got.content

    default = requests.get(f"{url_of(case_id, rgb)}/rendered", headers=headers, timeout=30)
    assert default.headers["content-type"] == "image/jpeg"
    mp4 = requests.get(
        f"{url_of(case_id, rgb)}/rendered", headers={"Accept": "video/mp4", **headers}, timeout=30
    )
    assert mp4.status_code == 406
    assert "video/webm" in mp4.json()["detail"] and "image/gif" in mp4.json()["detail"]
    wado_mp4 = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(rgb, contentType="video/mp4"),
        headers=headers,
        timeout=30,
    )
    assert wado_mp4.status_code == 406
    assert "video/webm" in wado_mp4.json()["detail"] and "image/gif" in wado_mp4.json()["detail"]
    one = requests.get(
        f"{url_of(case_id, single)}/rendered", headers={"Accept": "video/webm", **headers}, timeout=30
    )
    assert one.status_code == 406 and "single image" in one.json()["detail"]
    viewport = requests.get(
        f"{url_of(case_id, rgb)}/rendered",
        params={"viewport": "64,64"},
        headers={"Accept": "video/webm", **headers},
        timeout=30,
    )
    assert viewport.status_code == 400 and "viewport" in viewport.json()["detail"]


def test_a_webm_is_encoded_once_then_served_from_the_cache_with_ranges_and_head(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    cine = rgb_cine(study, 10, 64, 48, frame_time=40.0)
    case_id, _ = stored(engine, settings, cine)
    headers = {"Accept": "video/webm", **operations_headers(settings)}
    rendered = f"{url_of(case_id, cine)}/rendered"

    before = cached_webm()
    head = requests.head(rendered, headers=headers, timeout=10)
    assert (head.status_code, head.headers["content-type"], head.content) == (200, "video/webm", b"")
    assert "content-length" not in head.headers and cached_webm() == before  # a HEAD encodes nothing

    whole = requests.get(rendered, headers=headers, timeout=60).content
    [made] = set(cached_webm()) - set(before)
    inode = made.stat().st_ino
    assert made.read_bytes() == whole

    part = requests.get(rendered, headers={"Range": "bytes=10-209", **headers}, timeout=10)
    assert part.status_code == 206 and part.content == whole[10:210]
    assert part.headers["content-range"] == f"bytes 10-209/{len(whole)}"
    tail = requests.get(rendered, headers={"Range": "bytes=-100", **headers}, timeout=10)
    assert tail.status_code == 206 and tail.content == whole[-100:]
    beyond = requests.get(rendered, headers={"Range": f"bytes={len(whole) + 1}-", **headers}, timeout=10)
    assert beyond.status_code == 416
    head = requests.head(rendered, headers=headers, timeout=10)
    assert head.headers["content-length"] == str(len(whole))
    again = requests.get(rendered, headers=headers, timeout=10)
    assert again.content == whole
    assert made.stat().st_ino == inode  # not encoded again: a new encode replaces the file (a new inode)


def test_video_over_the_encoding_limits_is_a_413_and_a_busy_encoder_a_503_with_retry_after(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    small = RenderLimits(max_video_pixels=10 * 64 * 48 - 1, video_encodes=1, video_encode_wait_seconds=0.2)
    with serving(engine, settings, overrides={get_render_limits: lambda: small}) as url:
        BASE[:] = [url]
        study = new_study()
        long_cine = rgb_cine(study, 10, 64, 48, frame_time=40.0)
        short_cine = rgb_cine(study, 9, 64, 48, frame_time=40.0)
        clip = mpeg2_instance(study, mpeg2_stream(10, 25, 64, 48), 10, 64, 48)
        case_id, _ = stored(engine, settings, long_cine, short_cine, clip)
        headers = {"Accept": "video/webm", **operations_headers(settings)}
        for too_long in (long_cine, clip):
            got = requests.get(f"{url_of(case_id, too_long)}/rendered", headers=headers, timeout=30)
            assert got.status_code == 413, got.text
            assert "RECORDS_RENDER_MAX_VIDEO_PIXELS" in got.json()["detail"]

        with webm.encoding_slot(small):  # another encode under way, holding the one slot
            busy = requests.get(f"{url_of(case_id, short_cine)}/rendered", headers=headers, timeout=30)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert "RECORDS_RENDER_VIDEO_ENCODES" in busy.json()["detail"]
        later = requests.get(f"{url_of(case_id, short_cine)}/rendered", headers=headers, timeout=30)
        assert later.status_code == 200 and later.headers["content-type"] == "video/webm"


def test_concurrent_requests_for_one_new_webm_encode_it_once(
    engine: Engine,  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A <video> element's Range requests arrive before the first answer ends: they wait for the one encode."""
    study = new_study()
    cine = rgb_cine(study, 30, 96, 64, frame_time=40.0)
    case_id, _ = stored(engine, settings, cine)
    headers = {"Accept": "video/webm", **operations_headers(settings)}
    encodes = []
    real = webm._write

    def counted(*args: object, **kwargs: object) -> int:
        encodes.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(webm, "_write", counted)
    answers: list[bytes] = []

    def fetch() -> None:
        answers.append(requests.get(f"{url_of(case_id, cine)}/rendered", headers=headers, timeout=60).content)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(encodes) == 1 and len(answers) == 3 and len(set(answers)) == 1


BROWSER_PAGE = """<!doctype html><html><body><pre id="out">{{}}</pre>
<video id="webm" muted autoplay playsinline src="{webm}"></video>
<video id="mp4" muted autoplay playsinline src="{mp4}"></video>
<script>
const out = document.getElementById("out"), seen = {{}};
for (const v of document.querySelectorAll("video")) {{
  const note = (state) => {{ seen[v.id] = state; out.textContent = JSON.stringify(seen); }};
  v.addEventListener("error", () => note({{error: v.error && v.error.code}}));
  v.addEventListener("timeupdate", () => note({{width: v.videoWidth, height: v.videoHeight, time: v.currentTime,
                                               duration: v.duration}}));
}}
</script></body></html>"""


def test_a_browser_plays_the_webm_of_an_mpeg2_clip_from_a_signed_link_and_not_its_mp4(
    engine: Engine,  # noqa: F811
    settings: Settings,
    tmp_path: Path,
) -> None:
    """Headless Chromium loads the clip's default rendering (its signed `rendered` link, as a page puts in a
    <video src>) and plays it: a picture of the clip's size, time advancing; the MPEG-2 MP4 it refuses, which is
    why WebM is the MPEG-2 default."""
    from tests.integration.test_records_signed_links import mint, owned_case

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing: apt-get install chromium (.ci/run installs it)")
    frames, rate, width, height = 50, 25, 160, 120
    study = new_study()
    clip = mpeg2_instance(study, mpeg2_stream(frames, rate, width, height), frames, width, height)
    case_id, key = owned_case(engine, settings, clip)
    links = mint(case_id, clip, key).json()
    page = tmp_path / "player.html"
    page.write_text(BROWSER_PAGE.format(webm=links["rendered"], mp4=links["mp4"]))
    run = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # as root in CI containers
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--autoplay-policy=no-user-gesture-required",
            "--virtual-time-budget=8000",  # page time: the 2 s clip plays through without waiting 2 s
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    seen = json.loads(found.group(1))
    played = seen.get("webm", {})
    assert (played.get("width"), played.get("height")) == (width, height), seen
    assert played["time"] > 0.5 and abs(played["duration"] - frames / rate) < 0.1, seen
    assert seen.get("mp4") == {"error": 4}, seen  # MEDIA_ERR_SRC_NOT_SUPPORTED: MPEG-2 in an MP4
