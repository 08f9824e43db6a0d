"""Ultrasound cine clips stored as H.264 (PS3.5 8.2.7) rendered as an MP4 a browser plays (WADO-RS `/rendered`,
WADO-URI `contentType=video/mp4`): a real clip encoded with PyAV's libx264, wrapped as DICOM, stored through
STOW-RS, and the answer opened with PyAV as a browser's demuxer opens it."""

from __future__ import annotations

import io
import sys

import av
import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest
import requests
from sqlalchemy.engine import Engine

from services.auth import access, audit
from services.auth.read_windows import ReadWindows
from services.common.config import Settings
from services.common.db import get_engine
from services.records.rendering import get_render_limits
from services.records.video import cache_dir
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import instances, new_study
from tests.integration.test_records_rendered import (  # noqa: F401 - the fixtures
    BASE,
    _base,
    base_url,
    engine,
    stored,
    url_of,
    wado_params,
)
from tests.keys import operations_headers

WIDTH, HEIGHT, FRAMES, RATE = 64, 48, 30, 20


def picture(i: int) -> npt.NDArray[np.uint8]:
    """Frame i: a bright bar 2 x i pixels wide on black, so the order frames are shown in can be read back."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, : 2 * i] = 220
    return image


def h264_stream() -> bytes:
    """An H.264 High profile Annex B stream with B-frames (shown in another order than decoded), as an
    ultrasound system writes one."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.profile = "High"
        stream.options = {"level": "4.1", "x264-params": "keyint=12:bframes=3"}
        for i in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def h264_instance(study: str, stream: bytes) -> pydicom.Dataset:
    """The stream as a DICOM instance in MPEG-4 AVC/H.264 High Profile / Level 4.1 (1.2.840.10008.1.2.4.102):
    encapsulated Pixel Data, an empty Basic Offset Table, the bitstream split over several fragments."""
    ds = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(
                None, study_uid=study, series_uid=study + ".1", frames=FRAMES, rows=HEIGHT, cols=WIDTH
            )
        )
    )
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "YBR_PARTIAL_420", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.CineRate, ds.FrameTime = RATE, 1000 / RATE
    ds.PixelData = pydicom.encaps.encapsulate([stream], fragments_per_frame=3)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
    return ds


def decoded_frames(data: bytes, format: str | None = None) -> list[npt.NDArray[np.uint8]]:
    with av.open(io.BytesIO(data), "r", format=format) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def display_times(data: bytes) -> list[float]:
    """When each picture of the MP4 is shown, in seconds, in the order the decoder hands them out (the order
    they are shown in): what a browser's player times them by."""
    with av.open(io.BytesIO(data), "r") as container:
        return [float(frame.time) for frame in container.decode(video=0) if frame.time is not None]


def cached_clips() -> set[str]:
    return {p.name for p in cache_dir(get_render_limits()).glob("*.mp4")}


def test_an_h264_clip_plays_as_an_mp4_remuxed_not_reencoded_and_seekable(
    engine: Engine,  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    windows = ReadWindows(600)
    monkeypatch.setattr(access, "get_read_windows", lambda: windows)
    study = new_study()
    stream = h264_stream()
    clip = h264_instance(study, stream)
    case_id, client = stored(engine, settings, clip)
    headers = operations_headers(settings)
    rendered = f"{url_of(case_id, clip)}/rendered"

    before = cached_clips()
    head = requests.head(rendered, headers={"Accept": "video/mp4", **headers}, timeout=10)
    assert (head.status_code, head.headers["content-type"], head.content) == (200, "video/mp4", b"")
    assert cached_clips() == before  # a HEAD remuxes nothing

    mp4 = client.retrieve_instance_rendered(
        study, clip.SeriesInstanceUID, clip.SOPInstanceUID, media_types=("video/mp4",)
    )
    assert mp4[4:8] == b"ftyp" and mp4.find(b"moov") < mp4.find(b"mdat")  # index first: plays as it arrives
    with av.open(io.BytesIO(mp4), "r") as container:
        assert "mp4" in container.format.name
        video = container.streams.video[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", WIDTH, HEIGHT)
        assert video.frames == FRAMES and video.average_rate == RATE
        assert container.duration is not None and abs(container.duration / 1e6 - FRAMES / RATE) < 0.1
    shown = decoded_frames(mp4)
    assert len(shown) == FRAMES
    # The very pictures the stored stream decodes to (a re-encoding would change them), in the order taken.
    assert all(np.array_equal(a, b) for a, b in zip(shown, decoded_frames(stream, "h264"), strict=True))
    bars = [int((frame[HEIGHT // 2, :, 0] > 110).sum()) for frame in shown]
    assert bars == [2 * i for i in range(FRAMES)]
    times = display_times(mp4)  # each picture at its own time, 1/20 s apart: none shown out of turn
    assert len(times) == FRAMES and all(abs(t - times[0] - i / RATE) < 1e-3 for i, t in enumerate(times))

    default = requests.get(rendered, headers=headers, timeout=10)  # Accept */*: a video's default is MP4
    assert default.status_code == 200 and default.headers["content-type"] == "video/mp4"
    assert default.content == mp4 and default.headers["accept-ranges"] == "bytes"

    part = requests.get(rendered, headers={"Range": "bytes=100-599", **headers}, timeout=10)
    assert part.status_code == 206 and part.content == mp4[100:600]
    assert part.headers["content-range"] == f"bytes 100-599/{len(mp4)}"
    tail = requests.get(rendered, headers={"Range": f"bytes=-{len(mp4) // 3}", **headers}, timeout=10)
    assert tail.status_code == 206 and tail.content == mp4[-(len(mp4) // 3) :]
    beyond = requests.get(rendered, headers={"Range": f"bytes={len(mp4) + 10}-", **headers}, timeout=10)
    assert beyond.status_code == 416
    # A <video> element resuming or seeking sends If-Range with what it was given: each use of the cached clip
    # leaves its validators as they were, so the range comes back, not the whole clip again.
    assert part.headers["etag"] == default.headers["etag"] == tail.headers["etag"]
    for validator in (default.headers["etag"], default.headers["last-modified"]):
        resumed = requests.get(
            rendered, headers={"Range": "bytes=600-", "If-Range": validator, **headers}, timeout=10
        )
        assert resumed.status_code == 206 and resumed.content == mp4[600:]

    wado = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(clip, contentType="video/mp4"),
        headers={"Range": "bytes=0-99", **headers},
        timeout=10,
    )
    assert wado.status_code == 206 and wado.headers["content-type"] == "video/mp4"
    assert wado.content == mp4[:100]

    entries = [
        e
        for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
        if clip.SOPInstanceUID in e.detail
    ]
    assert len(entries) == 1 and entries[0].outcome == "success"  # every range of it: one read, audited


def test_a_clip_refuses_image_parameters_and_a_cine_of_frames_is_not_an_mp4(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    study = new_study()
    clip = h264_instance(study, h264_stream())
    cine = instances(study)[2]  # 4 frames stored uncompressed
    case_id, _ = stored(engine, settings, clip, cine)
    headers = operations_headers(settings)

    viewport = requests.get(
        f"{url_of(case_id, clip)}/rendered", params={"viewport": "32,24"}, headers=headers, timeout=10
    )
    assert viewport.status_code == 400 and "viewport apply to images" in viewport.json()["detail"]
    jpeg = requests.get(
        f"{url_of(case_id, clip)}/rendered", headers={"Accept": "image/jpeg", **headers}, timeout=10
    )
    assert jpeg.status_code == 406 and "renders as video/mp4" in jpeg.json()["detail"]
    frame = requests.get(f"{url_of(case_id, clip)}/frames/1/rendered", headers=headers, timeout=10)
    assert frame.status_code == 406 and "video/mp4" in frame.json()["detail"]

    mp4 = requests.get(
        f"{url_of(case_id, cine)}/rendered", headers={"Accept": "video/mp4", **headers}, timeout=10
    )
    assert mp4.status_code == 406 and "animates as image/gif" in mp4.json()["detail"]
    either = requests.get(
        f"{url_of(case_id, cine)}/rendered",
        headers={"Accept": "video/mp4, image/gif;q=0.5", **headers},
        timeout=10,
    )
    assert either.status_code == 200 and either.headers["content-type"] == "image/gif"
    wado = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(cine, contentType="video/mp4"),
        headers=headers,
        timeout=10,
    )
    assert wado.status_code == 406 and "image/gif" in wado.json()["detail"]
    rows = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(clip, contentType="video/mp4", rows="24"),
        headers=headers,
        timeout=10,
    )
    assert rows.status_code == 400 and "rows" in rows.json()["detail"]


def test_an_hevc_clip_without_timing_in_its_bitstream_is_timed_by_the_instances_cine_rate(
    engine: Engine,  # noqa: F811
    settings: Settings,
) -> None:
    """An HEVC stream with no VUI timing (x265 `vui-timing-info=0`) stored at Cine Rate 15: the MP4 plays at
    15 frames a second (FFmpeg alone would take 25), in the sample entry Safari plays (hvc1)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="hevc") as out:
        stream = out.add_stream("libx265", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"x265-params": "log-level=error:vui-timing-info=0:bframes=2"}
        for i in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    study = new_study()
    clip = h264_instance(study, buffer.getvalue())
    clip.file_meta.TransferSyntaxUID = pydicom.uid.HEVCMP51
    clip.CineRate, clip.FrameTime = 15, 1000 / 15
    case_id, _ = stored(engine, settings, clip)
    got = requests.get(
        f"{url_of(case_id, clip)}/rendered",
        headers={"Accept": "video/*", **operations_headers(settings)},
        timeout=10,
    )
    assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(got.content), "r") as container:
        video = container.streams.video[0]
        assert (video.codec_context.name, video.codec_tag) == ("hevc", "hvc1")
        assert video.frames == FRAMES and video.average_rate == 15
    bars = [int((frame[HEIGHT // 2, :, 0] > 110).sum()) for frame in decoded_frames(got.content)]
    assert bars == [2 * i for i in range(FRAMES)]
    times = display_times(got.content)
    assert len(times) == FRAMES and all(abs(t - times[0] - i / 15) < 1e-3 for i, t in enumerate(times))


def test_without_pyav_a_clip_is_a_clear_406_and_still_retrievable_as_stored(
    engine: Engine,  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PyAV is the optional `video` extra (its wheels carry GPL code): a deployment without it says so, and the
    clip is still handed out as stored."""
    study = new_study()
    clip = h264_instance(study, h264_stream())
    case_id, _ = stored(engine, settings, clip)
    headers = operations_headers(settings)
    for path in cache_dir(get_render_limits()).glob("*"):
        path.unlink()  # a clip remuxed before would be served from the cache
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` meets where it is not installed

    mp4 = requests.get(
        f"{url_of(case_id, clip)}/rendered", headers={"Accept": "video/mp4", **headers}, timeout=10
    )
    assert mp4.status_code == 406, mp4.text
    assert "optional `video` extra" in mp4.json()["detail"]
    whole = requests.get(
        url_of(case_id, clip), headers={"Accept": "application/dicom", **headers}, timeout=10
    )
    assert whole.status_code == 200
