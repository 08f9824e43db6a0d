"""A subspecialist's browser viewer (OHIF Viewer v3) reading a case's ultrasound study over records' DICOMweb:
the requests OHIF makes, made by the library it makes them with (`dicomweb-client` for JavaScript, run by
Node from tests/viewer, `npm ci` there), with the specialist's own key."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from sqlalchemy.engine import Engine

from services.auth import tenancy
from services.auth.deps import rate_limiter
from services.auth.rate_limit import RateLimiter
from services.common import migrate
from services.common.config import Settings
from services.common.db import get_engine, make_engine
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import new_study, open_case, serving
from tests.keys import operations_headers, specialist_headers

VIEWER_CLIENT = Path(__file__).parents[1] / "viewer"
SPECIALIST = "spec-mfm-viewer"


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture(scope="module")
def base_url(engine: Engine, settings: Settings) -> Iterator[str]:
    with serving(engine, settings) as url:
        yield url


def rgb_cine(study: str, series: str, frames: int) -> pydicom.Dataset:
    """A B-mode clip as carts send it uncompressed: RGB, 30 frames a second, one calibrated region."""
    clip = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(None, study_uid=study, series_uid=series, frames=frames, rows=96, cols=128)
        )
    )
    rng = np.random.default_rng(7)
    clip.PixelData = rng.integers(0, 255, size=(frames, 96, 128, 3), dtype=np.uint8).tobytes()
    clip.SamplesPerPixel, clip.PhotometricInterpretation, clip.PlanarConfiguration = 3, "RGB", 0
    clip.FrameTime, clip.CineRate, clip.RecommendedDisplayFrameRate = 33.3, 30, 30
    clip.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    clip.SeriesDescription = "B-mode cine"
    return clip


def jpeg_cine(study: str, series: str, frames: int) -> pydicom.Dataset:
    """The same as most carts send it: JPEG Baseline, YBR_FULL_422, each frame its own fragment."""
    clip = rgb_cine(study, series, frames)
    pixels = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(frames, 96, 128, 3)
    encoded = []
    for frame in pixels:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90, subsampling=1)  # 4:2:2
        encoded.append(buffer.getvalue())
    clip.PixelData = pydicom.encaps.encapsulate(encoded)
    clip["PixelData"].VR = "OB"
    clip.PhotometricInterpretation = "YBR_FULL_422"
    clip.LossyImageCompression = "01"
    clip.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    clip.SOPInstanceUID = clip.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    clip.SeriesNumber, clip.SeriesDescription, clip.SeriesDate = 2, "Doppler cine", "20261120"
    return clip


def frames_of(dataset: pydicom.Dataset) -> list[bytes]:
    count = int(dataset.get("NumberOfFrames") or 1)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        return list(pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=count))
    size = len(dataset.PixelData) // count
    return [dataset.PixelData[i * size : (i + 1) * size] for i in range(count)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_ohif(root: str, token: str, study: str) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (VIEWER_CLIENT / "node_modules" / "dicomweb-client").is_dir():
        pytest.fail("Node.js and tests/viewer/node_modules are needed: make install runs npm ci there")
    done = subprocess.run(
        [node, str(VIEWER_CLIENT / "ohif_requests.mjs")],
        input=json.dumps({"root": root, "token": token, "study": study}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def value(attrs: dict[str, Any], keyword: str) -> Any:
    element = attrs.get(f"{pydicom.tag.Tag(keyword):08X}", {})
    return (element.get("Value") or [None])[0]


def test_ohif_shows_a_specialists_ultrasound_study(base_url: str, engine: Engine, settings: Settings) -> None:
    """OHIF's study list, series list, series metadata, each frame as Cornerstone loads it (the thumbnail is
    frame 1), frames in the media types a configured acceptHeader asks for, and the pixel data's
    BulkDataURI, all with the specialist's key: every request a 200 that parses, every frame the stored
    bytes, the metadata what a cine needs."""
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    image = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    native, jpeg = rgb_cine(study, study + ".1", 12), jpeg_cine(study, study + ".2", 6)
    image.InstanceNumber, native.InstanceNumber = 1, 2
    # Ten seconds at 30 frames a second, as a sweep through a fetal heart is kept: 300 frames, each a request.
    sweep = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(None, study_uid=study, series_uid=study + ".3", frames=300, rows=32, cols=32)
        )
    )
    root = f"{base_url}/dicomweb/cases/{case_id}"
    DICOMwebClient(url=root, headers=operations_headers(settings)).store_instances(
        [image, native, jpeg, sweep]
    )
    headers = specialist_headers(settings, SPECIALIST)
    tenancy.settle_reviewer(
        get_engine("auth"),
        case_id,
        SPECIALIST,
        lambda: tenancy.ReviewerStanding(True, "the case is offered to them"),
        service="review",
    )

    seen = as_ohif(root, headers["Authorization"].removeprefix("Bearer "), study)
    steps, made = seen["steps"], seen["requests"]

    failed = [(r["method"], r["url"].removeprefix(root), r["accept"], r["status"]) for r in made]
    assert [f for f in failed if f[3] != 200] == []
    assert all(r["authorization"] for r in made)
    [listed] = steps["studies"]
    assert value(listed, "StudyInstanceUID") == study and value(listed, "NumberOfStudyRelatedInstances") == 4
    assert [value(s, "StudyInstanceUID") for s in steps["studiesByUid"]] == [study]
    assert [value(s, "StudyInstanceUID") for s in steps["studiesOfPatient"]] == [study]
    assert steps["studiesOfAnotherPatient"] == []  # a key named by its tag is matched too
    assert [value(s, "StudyInstanceUID") for s in steps["studiesByAccession"]] == [study]
    series = {value(s, "SeriesInstanceUID"): s for s in steps["series"]}
    assert sorted(series) == [study + ".1", study + ".2", study + ".3"]
    assert all("00080021" in s for s in series.values())  # includefield: SeriesDate, present when empty
    assert (value(series[study + ".2"], "SeriesDescription"), value(series[study + ".2"], "SeriesDate")) == (
        "Doppler cine",
        "20261120",
    )

    metadata = {value(m, "SOPInstanceUID"): m for ms in steps["metadata"].values() for m in ms}
    assert set(metadata) == {
        image.SOPInstanceUID,
        native.SOPInstanceUID,
        jpeg.SOPInstanceUID,
        sweep.SOPInstanceUID,
    }
    assert [f.get("sha256") for f in steps["frames"][sweep.SOPInstanceUID]] == [
        sha256(f) for f in frames_of(sweep)
    ]
    for sent in (native, jpeg):
        shown = metadata[sent.SOPInstanceUID]
        assert value(shown, "NumberOfFrames") == sent.NumberOfFrames
        assert (value(shown, "FrameTime"), value(shown, "CineRate")) == (33.3, 30)
        assert value(shown, "FrameIncrementPointer") == "00181063"
        assert value(shown, "PhotometricInterpretation") == sent.PhotometricInterpretation
        assert (value(shown, "Rows"), value(shown, "Columns"), value(shown, "SamplesPerPixel")) == (
            96,
            128,
            3,
        )
        region = value(shown, "SequenceOfUltrasoundRegions")
        assert value(region, "PhysicalDeltaX") == 0.01 and value(region, "PhysicalUnitsXDirection") == 3

        expected = [sha256(f) for f in frames_of(sent)]
        loaded = steps["frames"][sent.SOPInstanceUID]
        assert [f["sha256"] for f in loaded] == expected
        assert steps["framesNegotiated"][sent.SOPInstanceUID] == [expected[0], expected[-1]]
        for bulk in (steps["bulkData"][sent.SOPInstanceUID], steps["bulkDataMultipart"][sent.SOPInstanceUID]):
            assert bulk["uri"].startswith(f"{root}/studies/{study}/series/")
            assert bulk["parts"] == expected
    assert {f["contentType"] for f in steps["frames"][native.SOPInstanceUID]} == {
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    }
    assert {f["contentType"] for f in steps["frames"][jpeg.SOPInstanceUID]} == {
        "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    }
    [still] = steps["frames"][image.SOPInstanceUID]
    assert still["sha256"] == sha256(image.PixelData)


VIEWER = "https://viewer.example.org"


@pytest.fixture(scope="module")
def viewer_url(engine: Engine, settings: Settings) -> Iterator[str]:
    """The same routes where VIEWER_ORIGINS lists the viewer's origin."""
    with serving(engine, settings.model_copy(update={"viewer_origins": [VIEWER]})) as url:
        yield url


def preflight(url: str, origin: str) -> requests.Response:
    """What a browser sends before a GET that carries `Authorization` (it sends no key with it)."""
    return requests.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,accept",
        },
        timeout=10,
    )


def test_a_viewer_on_a_listed_origin_reads_dicomweb_from_the_browser(
    viewer_url: str, base_url: str, engine: Engine, settings: Settings
) -> None:
    """A browser viewer on another origin could not read DICOMweb at all: the preflight was a 405 without
    CORS headers, so the browser never sent the GET. A listed origin is answered (by name, never `*`, no
    credentials) with the headers a viewer reads exposed, on an error too; another origin, another path and a
    service without VIEWER_ORIGINS get no CORS headers."""
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    image = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    DICOMwebClient(
        url=f"{viewer_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings)
    ).store_instances([image])
    tenancy.settle_reviewer(
        get_engine("auth"),
        case_id,
        SPECIALIST,
        lambda: tenancy.ReviewerStanding(True, "offered"),
        service="review",
    )
    frame = f"/dicomweb/cases/{case_id}/studies/{study}/series/{study}.1/instances/{image.SOPInstanceUID}/frames/1"

    asked = preflight(viewer_url + frame, VIEWER)
    assert asked.status_code == 200
    assert asked.headers["access-control-allow-origin"] == VIEWER
    assert "authorization" in asked.headers["access-control-allow-headers"].lower()
    assert "GET" in asked.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in asked.headers
    assert "Origin" in asked.headers["vary"]

    viewer = {
        "Origin": VIEWER,
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
    }
    got = requests.get(
        viewer_url + frame, headers={**viewer, **specialist_headers(settings, SPECIALIST)}, timeout=10
    )
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == VIEWER
    exposed = {h.strip().lower() for h in got.headers["access-control-expose-headers"].split(",")}
    assert {"content-type", "content-length", "etag", "warning"} <= exposed
    assert "access-control-allow-credentials" not in got.headers
    keyless = requests.get(viewer_url + frame, headers=viewer, timeout=10)
    assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == VIEWER

    elsewhere = "https://evil.example.com"
    refused = preflight(viewer_url + frame, elsewhere)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    read = requests.get(
        viewer_url + frame,
        headers={**viewer, "Origin": elsewhere, **specialist_headers(settings, SPECIALIST)},
        timeout=10,
    )
    assert (
        read.status_code == 200 and "access-control-allow-origin" not in read.headers
    )  # the browser blocks it
    assert (
        "access-control-allow-origin" not in preflight(f"{viewer_url}/v1/records/{case_id}", VIEWER).headers
    )
    assert (
        "access-control-allow-origin" not in preflight(base_url + frame, VIEWER).headers
    )  # no VIEWER_ORIGINS


@pytest.mark.parametrize("origin", ["*", "https://viewer.example.org/ohif", "viewer.example.org", "null"])
def test_viewer_origins_are_origins_only(origin: str) -> None:
    with pytest.raises(ValueError, match="scheme://host\\[:port\\] with no path and no wildcard"):
        Settings(viewer_origins=[origin])


def test_viewer_origins_are_read_as_a_list_separated_by_commas() -> None:
    origins = Settings(viewer_origins="https://Viewer.example.org, http://localhost:3000").viewer_origins
    assert origins == ["https://viewer.example.org", "http://localhost:3000"]


def test_an_instance_is_sent_as_stored_when_a_later_accepted_syntax_allows_it(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """An Accept header lists the transfer syntax the client prefers first and transfer-syntax=* after it:
    only the first media range was read, and an instance stored in another syntax was a 406."""
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    clip = jpeg_cine(study, study + ".2", 2)
    root = f"{base_url}/dicomweb/cases/{case_id}"
    DICOMwebClient(url=root, headers=operations_headers(settings)).store_instances([clip])
    url = f"{root}/studies/{study}/series/{clip.SeriesInstanceUID}/instances/{clip.SOPInstanceUID}"
    explicit = "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    accept = f"{explicit}, application/dicom; transfer-syntax=*"
    got = requests.get(url, headers={"Accept": accept, **operations_headers(settings)}, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
    sent = pydicom.dcmread(io.BytesIO(got.content))
    assert sent.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert frames_of(sent) == frames_of(clip)
    refused = requests.get(url, headers={"Accept": explicit, **operations_headers(settings)}, timeout=10)
    assert refused.status_code == 406 and "no transcoding here" in refused.json()["detail"]


def test_a_viewer_reads_a_cine_frame_by_frame_beyond_the_api_rate_limit(
    engine: Engine, settings: Settings
) -> None:
    """Frames draw on their own bucket (AUTH_RATE_IMAGES_*): a viewer asks for each frame of a clip alone, and
    on the API's bucket the frames past its burst were 429s. Here the API's bucket holds 3 requests."""
    api_bucket = RateLimiter(per_second=0.5, burst=3)
    with serving(engine, settings, overrides={rate_limiter: lambda: api_bucket}) as url:
        study = new_study()
        case_id = open_case(engine, settings, study_uid=study)
        clip = pydicom.dcmread(
            io.BytesIO(
                make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=8, rows=8, cols=8)
            )
        )
        root = f"{url}/dicomweb/cases/{case_id}"
        DICOMwebClient(url=root, headers=operations_headers(settings)).store_instances([clip])
        headers = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
        headers |= specialist_headers(settings, "spec-rate-viewer")
        tenancy.settle_reviewer(
            get_engine("auth"),
            case_id,
            "spec-rate-viewer",
            lambda: tenancy.ReviewerStanding(True, "offered"),
            service="review",
        )
        frames = f"{root}/studies/{study}/series/{study}.1/instances/{clip.SOPInstanceUID}/frames"
        answers = [
            requests.get(f"{frames}/{n}", headers=headers, timeout=10).status_code for n in range(1, 9)
        ]
        assert answers == [200] * 8
        searches = [
            requests.get(f"{root}/studies", headers=headers, timeout=10).status_code for _ in range(4)
        ]
        assert searches[-1] == 429  # the API's own bucket still bounds everything else


def test_a_video_clip_is_handed_out_as_its_whole_bitstream(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """An MPEG-4 clip's frames are one bitstream. Its BulkDataURI named 30 frames, and a frame of it was looked
    up as a fragment: the answer broke off mid-stream. Now the URI names frame 1 and any frames of a video
    are answered with the whole stream, once, as video/mp4."""
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    clip = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=30, rows=8, cols=8)
        )
    )
    stream = b"\x00\x00\x00\x01\x67\x42" + bytes(range(256)) * 12  # an H.264 byte stream, in two fragments
    clip.PixelData = pydicom.encaps.encapsulate([stream[:1000], stream[1000:]])
    clip["PixelData"].VR = "OB"
    clip.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
    root = f"{base_url}/dicomweb/cases/{case_id}"
    client = DICOMwebClient(url=root, headers=operations_headers(settings))
    client.store_instances([clip])

    metadata = client.retrieve_instance_metadata(study, clip.SeriesInstanceUID, clip.SOPInstanceUID)
    uri = metadata["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{clip.SOPInstanceUID}/frames/1")
    for url in (uri, uri.removesuffix("/1") + "/1,2,3"):
        got = requests.get(
            url, headers=operations_headers(settings), timeout=10
        )  # OHIF's bulkdata: no Accept
        assert got.status_code == 200 and got.headers["content-type"].startswith(
            'multipart/related; type="video/mp4"'
        )
        [part] = [
            p
            for p in got.content.split(b"--" + got.headers["content-type"].split("boundary=")[1].encode())
            if p.strip(b"-\r\n")
        ]
        head, _, data = part.partition(b"\r\n\r\n")
        assert b"video/mp4; transfer-syntax=1.2.840.10008.1.2.4.102" in head
        assert data.removesuffix(b"\r\n") == stream


def test_frames_that_cannot_be_split_out_are_a_406_not_a_broken_answer(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """A clip whose encapsulated pixel data holds fewer fragments than frames, and no offsets: the frame was
    looked up while the answer streamed, and the connection broke off after the 200."""
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    clip = jpeg_cine(study, study + ".2", 3)
    clip.PixelData = pydicom.encaps.encapsulate(frames_of(clip)[:2])  # three frames, two fragments
    root = f"{base_url}/dicomweb/cases/{case_id}"
    DICOMwebClient(url=root, headers=operations_headers(settings)).store_instances([clip])
    url = f"{root}/studies/{study}/series/{clip.SeriesInstanceUID}/instances/{clip.SOPInstanceUID}/frames/3"
    accept = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    got = requests.get(url, headers={**accept, **operations_headers(settings)}, timeout=10)
    assert got.status_code == 406
    assert got.json()["detail"] == (
        "this instance's encapsulated pixel data cannot be split into its 3 frames; retrieve the whole instance instead"
    )
