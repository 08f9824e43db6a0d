"""Images rendered by records (WADO-RS `/rendered` and `/thumbnail`, WADO-URI), read as a web viewer, an EHR
image link or a reporting tool reads them: through `dicomweb-client` and plain HTTP against the real records
service and storage, each image decoded with Pillow and its grey levels checked against the window asked for."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.encaps
import pydicom.pixels
import pydicom.uid
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import access, audit, tenancy
from services.auth.partners import create_partner
from services.auth.rate_limit import reads_image_frames
from services.auth.read_windows import ReadWindows
from services.common import migrate
from services.common.config import Settings
from services.common.db import get_engine, make_engine
from services.records.rendering import RenderLimits, get_render_limits
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import instances, new_study, open_case, serving
from tests.integration.test_records_viewer import jpeg_cine
from tests.keys import operations_headers

Pixels = npt.NDArray[Any]


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture(scope="module")
def base_url(engine: Engine, settings: Settings) -> Iterator[str]:
    with serving(engine, settings) as url:
        yield url


COLUMN_VALUES = np.arange(64, dtype=np.uint8) * 4  # 0, 4, ... 252 from left to right


def gradient(study: str, series: str | None = None, **attributes: Any) -> pydicom.Dataset:
    """A 64x64 grey ramp, the same in each row: stored value 4 x column."""
    ds = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(None, study_uid=study, series_uid=series or study + ".1", rows=64, cols=64)
        )
    )
    ds.PixelData = np.tile(COLUMN_VALUES, (64, 1)).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def stored(engine: Engine, settings: Settings, *datasets: pydicom.Dataset) -> tuple[str, DICOMwebClient]:
    case_id = open_case(engine, settings)
    client = DICOMwebClient(url=root_of(case_id), headers=operations_headers(settings))
    client.store_instances(list(datasets))
    return case_id, client


BASE: list[str] = []


def root_of(case_id: str) -> str:
    return f"{BASE[0]}/dicomweb/cases/{case_id}"


@pytest.fixture(autouse=True)
def _base(base_url: str) -> None:
    BASE[:] = [base_url]


def url_of(case_id: str, ds: pydicom.Dataset) -> str:
    return (
        f"{root_of(case_id)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def decoded(data: bytes) -> Pixels:
    return np.asarray(Image.open(io.BytesIO(data)))


def linear_exact(x: Pixels, center: float, width: float) -> Pixels:
    """PS3.3 C.11.2.1.3.2 to 0..255."""
    return np.clip((x.astype(float) - center) / width + 0.5, 0, 1) * 255


def linear(x: Pixels, center: float, width: float) -> Pixels:
    """PS3.3 C.11.2.1.2.1 to 0..255."""
    return np.clip((x.astype(float) - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255


def row_of(image: Pixels) -> Pixels:
    assert (image == image[0]).all(), "each row of the ramp renders alike"
    return image[0].astype(int)


def test_a_ramp_rendered_with_two_windows_gives_the_grey_levels_each_window_says(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    ramp = gradient(study)
    case_id, client = stored(engine, settings, ramp)
    uids = (study, ramp.SeriesInstanceUID, ramp.SOPInstanceUID)

    wide = client.retrieve_instance_rendered(
        *uids, media_types=("image/png",), params={"window": "128,256,linear-exact"}
    )
    narrow = client.retrieve_instance_rendered(
        *uids, media_types=("image/png",), params={"window": "64,128,linear-exact"}
    )
    assert np.abs(row_of(decoded(wide)) - linear_exact(COLUMN_VALUES, 128, 256)).max() <= 1
    assert np.abs(row_of(decoded(narrow)) - linear_exact(COLUMN_VALUES, 64, 128)).max() <= 1
    assert row_of(decoded(narrow))[40] == 255 and row_of(decoded(wide))[40] == 159  # 160 x 255/256

    sigmoid = decoded(
        client.retrieve_instance_rendered(
            *uids, media_types=("image/png",), params={"window": "128,64,sigmoid"}
        )
    )
    expected = 255 / (1 + np.exp(-4 * (COLUMN_VALUES.astype(float) - 128) / 64))
    assert np.abs(row_of(sigmoid) - expected).max() <= 1

    # No Accept, no parameters: JPEG (the default), the stored 8-bit values as they are.
    default = requests.get(
        f"{url_of(case_id, ramp)}/rendered", headers=operations_headers(settings), timeout=10
    )
    assert default.status_code == 200 and default.headers["content-type"] == "image/jpeg"
    assert (
        np.abs(decoded(default.content).astype(int)[8:56, 8:56].mean(axis=0) - COLUMN_VALUES[8:56]).max() <= 4
    )


def test_the_instances_own_window_and_voi_lut_function_apply_when_none_is_asked_for(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    windowed = gradient(study, WindowCenter=64, WindowWidth=128, VOILUTFunction="LINEAR_EXACT")
    ct_like = gradient(study)  # 12 bits stored in 16, rescaled: the window is in rescaled units
    ct_like.BitsAllocated, ct_like.BitsStored, ct_like.HighBit = 16, 12, 11
    ct_like.PixelData = np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1)).astype("<u2").tobytes()
    ct_like.RescaleSlope, ct_like.RescaleIntercept, ct_like.RescaleType = 0.5, -1000, "US"
    case_id, client = stored(engine, settings, windowed, ct_like)

    own = client.retrieve_instance_frames_rendered(
        study, windowed.SeriesInstanceUID, windowed.SOPInstanceUID, [1], media_types=("image/png",)
    )
    assert np.abs(row_of(decoded(own)) - linear_exact(COLUMN_VALUES, 64, 128)).max() <= 1
    asked = client.retrieve_instance_frames_rendered(
        study, windowed.SeriesInstanceUID, windowed.SOPInstanceUID, [1],
        media_types=("image/png",), params={"window": "128,256,linear"},
    )  # fmt: skip
    assert np.abs(row_of(decoded(asked)) - linear(COLUMN_VALUES, 128, 256)).max() <= 1

    rescaled = client.retrieve_instance_rendered(
        study, ct_like.SeriesInstanceUID, ct_like.SOPInstanceUID,
        media_types=("image/png",), params={"window": "-500,1000,linear-exact"},
    )  # fmt: skip
    modality = np.arange(64) * 64 * 0.5 - 1000
    assert np.abs(row_of(decoded(rescaled)) - linear_exact(modality, -500, 1000)).max() <= 1


def test_monochrome1_is_inverted_and_colour_is_kept_whatever_its_layout(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    inverted = gradient(study, PhotometricInterpretation="MONOCHROME1")
    stripes = np.zeros((48, 48, 3), dtype=np.uint8)
    stripes[:, :16, 0], stripes[:, 16:32, 1], stripes[:, 32:, 2] = 200, 150, 100
    rgb = gradient(study)
    rgb.Rows = rgb.Columns = 48
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = stripes.tobytes()
    del rgb.SequenceOfUltrasoundRegions
    planar = copy.deepcopy(rgb)
    planar.SOPInstanceUID = pydicom.uid.generate_uid()
    planar.PlanarConfiguration = 1
    planar.PixelData = stripes.transpose(2, 0, 1).tobytes()
    ybr = copy.deepcopy(rgb)
    ybr.SOPInstanceUID = pydicom.uid.generate_uid()
    ybr.PhotometricInterpretation = "YBR_FULL"
    ybr.PixelData = pydicom.pixels.convert_color_space(stripes, "RGB", "YBR_FULL").tobytes()
    case_id, client = stored(engine, settings, inverted, rgb, planar, ybr)

    def png(ds: pydicom.Dataset) -> Pixels:
        return decoded(
            client.retrieve_instance_rendered(
                study, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=("image/png",)
            )
        )

    assert (row_of(png(inverted)) == 255 - COLUMN_VALUES).all()
    assert (png(rgb) == stripes).all()
    assert (png(planar) == stripes).all()
    assert np.abs(png(ybr).astype(int) - stripes).max() <= 2


def test_a_jpeg_baseline_ybr_cine_renders_its_colours_frame_by_frame(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    clip = jpeg_cine(study, study + ".2", 3)
    jpegs = list(pydicom.encaps.generate_frames(clip.PixelData, number_of_frames=3))
    original = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")).astype(int) for j in jpegs]
    case_id, client = stored(engine, settings, clip)
    frame = client.retrieve_instance_frames_rendered(
        study, clip.SeriesInstanceUID, clip.SOPInstanceUID, [2], media_types=("image/png",)
    )
    assert decoded(frame).shape == (96, 128, 3)
    assert np.abs(decoded(frame).astype(int) - original[1]).mean() < 2  # as a JPEG decoder shows frame 2
    assert np.abs(decoded(frame).astype(int) - original[0]).mean() > 40


def test_the_viewport_sizes_crops_and_flips_the_image(engine: Engine, settings: Settings) -> None:
    study = new_study()
    ramp = gradient(study)
    case_id, client = stored(engine, settings, ramp)
    uids = (study, ramp.SeriesInstanceUID, ramp.SOPInstanceUID)

    def png(viewport: str) -> Pixels:
        return decoded(
            client.retrieve_instance_frames_rendered(
                *uids, [1], media_types=("image/png",), params={"viewport": viewport}
            )
        )

    assert png("32,16").shape == (16, 16)  # the aspect ratio kept: fits in 32 x 16
    assert png("100,100,0,0,32,64").shape == (100, 50)
    flipped = png("32,64,32,0,-32,64")  # the left half, mirrored
    assert flipped.shape == (64, 32) and (row_of(flipped) == COLUMN_VALUES[:32][::-1]).all()
    outside = requests.get(
        f"{url_of(case_id, ramp)}/rendered", params={"viewport": "10,10,200,200,5,5"},
        headers=operations_headers(settings), timeout=10,
    )  # fmt: skip
    assert outside.status_code == 400 and "outside the 64x64 image" in outside.json()["detail"]


def test_a_cine_is_an_animated_gif_with_its_frame_timing(engine: Engine, settings: Settings) -> None:
    study = new_study()
    clip = instances(study)[2]  # 4 frames, Frame Time 33.3 ms
    case_id, client = stored(engine, settings, clip)
    uids = (study, clip.SeriesInstanceUID, clip.SOPInstanceUID)
    animated = Image.open(io.BytesIO(client.retrieve_instance_rendered(*uids, media_types=("image/gif",))))
    assert animated.n_frames == 4 and animated.info["loop"] == 0
    assert abs(animated.info["duration"] - 33.3) <= 10  # GIF counts hundredths of a second
    two = Image.open(
        io.BytesIO(client.retrieve_instance_frames_rendered(*uids, [2, 3], media_types=("image/gif",)))
    )
    assert two.n_frames == 2
    stored_frames = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(4, 64, 64)
    two.seek(1)
    assert (np.asarray(two.convert("L")) == stored_frames[2]).all()  # frame 3, grey levels kept

    jpeg = client.retrieve_instance_rendered(*uids)  # a single-frame type: the first frame
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    headers = operations_headers(settings)
    beyond = requests.get(f"{url_of(case_id, clip)}/frames/5/rendered", headers=headers, timeout=10)
    assert beyond.status_code == 404 and "ask for 1 to 4" in beyond.json()["detail"]
    several = requests.get(
        f"{url_of(case_id, clip)}/frames/1,2/rendered",
        headers={"Accept": "image/jpeg", **headers},
        timeout=10,
    )
    assert several.status_code == 406 and "image/gif" in several.json()["detail"]


def test_thumbnails_are_small_jpegs_of_a_representative_frame(engine: Engine, settings: Settings) -> None:
    study = new_study()
    burned_in = gradient(study, BurnedInAnnotation="YES")
    burned_in.Rows, burned_in.Columns = 64, 128
    burned_in.PixelData = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1)).tobytes()
    region = burned_in.SequenceOfUltrasoundRegions[0]
    region.RegionLocationMinX0, region.RegionLocationMaxX1 = 32, 95  # 64 x 64 of image; text beside it
    region.RegionLocationMinY0, region.RegionLocationMaxY1 = 0, 63
    case_id, _ = stored(engine, settings, burned_in)
    headers = operations_headers(settings)
    root = f"{root_of(case_id)}/studies/{study}"
    for path in ("", f"/series/{burned_in.SeriesInstanceUID}", f"/series/{burned_in.SeriesInstanceUID}/instances/{burned_in.SOPInstanceUID}",
                 f"/series/{burned_in.SeriesInstanceUID}/instances/{burned_in.SOPInstanceUID}/frames/1"):  # fmt: skip
        got = requests.get(f"{root}{path}/thumbnail", headers=headers, timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg", path
        thumbnail = Image.open(io.BytesIO(got.content))
        assert thumbnail.size == (128, 128), path  # the 64 x 64 region alone, scaled to 128
        assert abs(np.asarray(thumbnail)[:, :8].mean() - 64) < 8  # starts at the region's column 32
    unbounded = gradient(study, BurnedInAnnotation="YES")  # text may be anywhere: no thumbnail of it
    del unbounded.SequenceOfUltrasoundRegions
    DICOMwebClient(url=root_of(case_id), headers=headers).store_instances([unbounded])
    refused = requests.get(f"{url_of(case_id, unbounded)}/thumbnail", headers=headers, timeout=10)
    assert refused.status_code == 406 and "no thumbnail without burned-in text" in refused.json()["detail"]
    other_study = new_study()
    first, second = gradient(other_study, BurnedInAnnotation="YES"), gradient(other_study)
    del first.SequenceOfUltrasoundRegions
    DICOMwebClient(url=root_of(case_id), headers=headers).store_instances([first, second])
    skipped = requests.get(f"{root_of(case_id)}/studies/{other_study}/thumbnail", headers=headers, timeout=10)
    assert skipped.ok and Image.open(io.BytesIO(skipped.content)).size == (128, 128)  # the second image's
    small = requests.get(
        f"{root}/thumbnail",
        params={"viewport": "32,32"},
        headers={"Accept": "image/png", **headers},
        timeout=10,
    )
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)


def test_a_series_renders_as_one_part_per_image_and_says_what_it_left_out(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    ramp = gradient(study)
    video = h264_clip(study)
    case_id, client = stored(engine, settings, ramp, video)
    got = requests.get(
        f"{root_of(case_id)}/studies/{study}/series/{ramp.SeriesInstanceUID}/rendered",
        headers={"Accept": 'multipart/related; type="image/png"', **operations_headers(settings)},
        timeout=10,
    )
    assert got.status_code == 200 and got.headers["content-type"].startswith(
        'multipart/related; type="image/png"'
    )
    boundary = got.headers["content-type"].split("boundary=")[1].encode()
    parts = [p for p in got.content.split(b"--" + boundary) if p.strip(b"-\r\n")]
    assert len(parts) == 1
    head, _, body = parts[0].partition(b"\r\n\r\n")
    assert b"Content-Type: image/png" in head
    assert (row_of(decoded(body.removesuffix(b"\r\n"))) == COLUMN_VALUES).all()
    assert "1 instance(s) not rendered" in got.headers["warning"]


def h264_clip(study: str) -> pydicom.Dataset:
    clip = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=30, rows=8, cols=8)
        )
    )
    stream = b"\x00\x00\x00\x01\x67\x42" + bytes(range(256)) * 4
    clip.PixelData = pydicom.encaps.encapsulate([stream])
    clip["PixelData"].VR = "OB"
    clip.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
    return clip


def test_an_h264_clip_that_does_not_parse_is_refused_saying_why(engine: Engine, settings: Settings) -> None:
    study = new_study()
    clip = h264_clip(study)  # a start code and noise: no H.264 stream
    case_id, _ = stored(engine, settings, clip)
    headers = operations_headers(settings)
    got = requests.get(f"{url_of(case_id, clip)}/rendered", headers=headers, timeout=10)
    assert got.status_code == 406 and "bitstream could not be read" in got.json()["detail"]
    frame = requests.get(f"{url_of(case_id, clip)}/frames/1/rendered", headers=headers, timeout=10)
    assert frame.status_code == 406 and "video clip" in frame.json()["detail"]
    wado = requests.get(
        f"{BASE[0]}/dicomweb/wado",
        params=wado_params(clip, contentType="image/jpeg"),
        headers=headers,
        timeout=10,
    )
    assert (
        wado.status_code == 406
        and "renders whole as video (video/webm or video/mp4)" in wado.json()["detail"]
    )


def test_bad_rendering_parameters_are_a_400_naming_the_parameter(engine: Engine, settings: Settings) -> None:
    study = new_study()
    ramp = gradient(study)
    case_id, _ = stored(engine, settings, ramp)
    headers = operations_headers(settings)
    for params, words in [
        ({"annotation": "patient"}, "annotation is not supported"),
        ({"window": "abc"}, "window is center,width"),
        ({"window": "40,0"}, "window width"),
        ({"window": "40,400,gamma"}, "linear, linear-exact or sigmoid"),
        ({"quality": "0"}, "quality is a whole number from 1 to 100"),
        ({"viewport": "10"}, "viewport is vw,vh"),
    ]:
        got = requests.get(f"{url_of(case_id, ramp)}/rendered", params=params, headers=headers, timeout=10)
        assert got.status_code == 400 and words in got.json()["detail"], params
    xml = requests.get(
        f"{url_of(case_id, ramp)}/rendered", headers={"Accept": "image/jp2", **headers}, timeout=10
    )
    assert xml.status_code == 406 and "image/jpeg, image/png, image/gif" in xml.json()["detail"]
    assert requests.get(
        f"{url_of(case_id, ramp)}/rendered",
        params={"quality": "40", "charset": "utf-8"},
        headers=headers,
        timeout=10,
    ).ok


def wado_params(ds: pydicom.Dataset, **more: str) -> dict[str, str]:
    return {
        "requestType": "WADO",
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
        **more,
    }


def new_partner() -> tuple[str, dict[str, str]]:
    """A partner of its own and its key."""
    with Session(get_engine("auth")) as session:
        created = create_partner(session, "Rendered Tests Clinic")
        session.commit()
    return created.partner_id, {"Authorization": f"Bearer {created.api_key}"}


def test_wado_uri_hands_out_the_instance_and_renders_it_for_the_cases_partner_only(
    engine: Engine, settings: Settings
) -> None:
    study = new_study()
    ramp = gradient(study)
    clip = instances(study)[2]
    case_id, _ = stored(engine, settings, ramp, clip)
    (owner, ours), (_, theirs) = new_partner(), new_partner()
    tenancy.register_owner(get_engine("auth"), case_id, owner)
    wado = f"{BASE[0]}/dicomweb/wado"

    dicom = requests.get(
        wado, params=wado_params(ramp, contentType="application/dicom"), headers=ours, timeout=10
    )
    as_wado_rs = requests.get(
        url_of(case_id, ramp), headers={"Accept": "application/dicom", **ours}, timeout=10
    )
    assert dicom.status_code == 200 and dicom.headers["content-type"] == "application/dicom"
    assert dicom.content == as_wado_rs.content  # the bytes WADO-RS hands out: stored pixels, our identifiers
    handed_out = pydicom.dcmread(io.BytesIO(dicom.content))
    assert handed_out.PixelData == ramp.PixelData and handed_out.PatientID == f"SO-{case_id}"

    anonymous = pydicom.dcmread(
        io.BytesIO(
            requests.get(
                wado,
                params=wado_params(ramp, contentType="application/dicom", anonymize="yes"),
                headers=ours,
                timeout=10,
            ).content
        )
    )
    assert anonymous.PixelData == ramp.PixelData
    assert (
        "DOE" not in str(anonymous.get("PatientName", "")) and anonymous.SOPInstanceUID != ramp.SOPInstanceUID
    )

    png = requests.get(
        wado,
        params=wado_params(ramp, contentType="image/png", windowCenter="64", windowWidth="128"),
        headers=ours,
        timeout=10,
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.abs(row_of(decoded(png.content)) - linear(COLUMN_VALUES, 64, 128)).max() <= 1
    jpeg = requests.get(
        wado, params=wado_params(ramp, rows="32"), headers=ours, timeout=10
    )  # image/jpeg: default
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).size == (
        32,
        32,
    )
    frame = requests.get(
        wado, params=wado_params(clip, contentType="image/png", frameNumber="3"), headers=ours, timeout=10
    )
    assert (
        decoded(frame.content) == np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(4, 64, 64)[2]
    ).all()
    gif = requests.get(wado, params=wado_params(clip, contentType="image/gif"), headers=ours, timeout=10)
    assert Image.open(io.BytesIO(gif.content)).n_frames == 4

    assert requests.get(wado, params=wado_params(ramp), headers=theirs, timeout=10).status_code == 404
    for params, words in [
        (
            wado_params(clip, contentType="image/png", frameNumber="5"),
            "frameNumber is a frame of this instance: 1 to 4",
        ),
        (wado_params(ramp, requestType="RS"), "requestType=WADO"),
        (wado_params(ramp, frameNumber="1"), "frameNumber applies to a multi-frame instance"),
        ({**wado_params(ramp), "objectUID": "not-a-uid"}, "objectUID is required"),
        (wado_params(ramp, contentType="application/dicom", rows="32"), "rows apply to images"),
        (wado_params(ramp, windowCenter="64"), "windowCenter and windowWidth come together"),
        (wado_params(ramp, region="0.5,0.5,0.2,0.9"), "region is x1,y1,x2,y2"),
    ]:
        got = requests.get(wado, params=params, headers=ours, timeout=10)
        assert got.status_code == 400 and words in got.json()["detail"], params
    other = requests.get(
        wado,
        params=wado_params(ramp, contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.50"),
        headers=ours,
        timeout=10,
    )
    assert other.status_code == 406 and "no transcoding" in other.json()["detail"]


def test_rendered_reads_are_audited_as_the_instances_reads_and_a_head_renders_nothing(
    engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renders, thumbnails and WADO-URI reads of one instance by one key within the window are one audit
    entry naming the instance, as its frames are; they draw on the image rate bucket; a HEAD writes none."""
    windows = ReadWindows(600)
    monkeypatch.setattr(access, "get_read_windows", lambda: windows)
    study = new_study()
    clip = instances(study)[2]
    case_id, _ = stored(engine, settings, clip)
    headers = operations_headers(settings)
    instance = url_of(case_id, clip)

    def entries() -> list[Any]:
        return [
            e
            for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
            if clip.SOPInstanceUID in e.detail
        ]

    head = requests.head(f"{instance}/rendered", headers={"Accept": "image/gif", **headers}, timeout=10)
    assert (head.status_code, head.headers["content-type"], head.content) == (200, "image/gif", b"")
    assert entries() == []
    for url, params in [
        (f"{instance}/rendered", {}),
        (f"{instance}/frames/2/rendered", {}),
        (f"{instance}/thumbnail", {}),
        (f"{BASE[0]}/dicomweb/wado", wado_params(clip)),
    ]:
        assert requests.get(url, params=params, headers=headers, timeout=10).status_code == 200, url
    [entry] = entries()
    assert entry.detail.startswith(
        f"study {study} series {clip.SeriesInstanceUID} instance {clip.SOPInstanceUID}"
    )
    assert entry.outcome == "success" and entry.resource == "records.dicomweb"
    for path in (
        f"{instance.removeprefix(BASE[0])}/rendered",
        f"{instance.removeprefix(BASE[0])}/thumbnail",
        "/dicomweb/wado",
    ):
        assert reads_image_frames("GET", path), path


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless])
def test_compressed_instances_render_as_their_native_form_does(
    engine: Engine, settings: Settings, syntax: pydicom.uid.UID
) -> None:
    """RLE (pydicom's own decoder) and JPEG-LS (pyjpegls) frames decoded on the server, one at a time."""
    study = new_study()
    ramp = gradient(study)
    ramp.compress(syntax)
    case_id, client = stored(engine, settings, ramp)
    png = client.retrieve_instance_rendered(
        study, ramp.SeriesInstanceUID, ramp.SOPInstanceUID, media_types=("image/png",)
    )
    assert (row_of(decoded(png)) == COLUMN_VALUES).all()


def test_palette_colour_is_looked_up(engine: Engine, settings: Settings) -> None:
    study = new_study()
    palette = gradient(study, PhotometricInterpretation="PALETTE COLOR")
    entries = np.arange(256, dtype=np.uint16)
    for colour, table in (("Red", entries * 257), ("Green", entries * 0), ("Blue", (255 - entries) * 257)):
        setattr(palette, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        palette[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(palette, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    del palette.SequenceOfUltrasoundRegions
    case_id, client = stored(engine, settings, palette)
    png = decoded(
        client.retrieve_instance_rendered(
            study, palette.SeriesInstanceUID, palette.SOPInstanceUID, media_types=("image/png",)
        )
    )
    assert (png[0, :, 0] == COLUMN_VALUES).all() and (png[..., 1] == 0).all()
    assert (png[0, :, 2] == 255 - COLUMN_VALUES).all()


def test_renderings_over_the_limits_are_a_413_naming_the_setting(engine: Engine, settings: Settings) -> None:
    small = RenderLimits(
        max_frame_pixels=64 * 64, max_viewport_pixels=100 * 100, max_animation_pixels=3 * 32 * 32
    )
    with serving(engine, settings, overrides={get_render_limits: lambda: small}) as url:
        BASE[:] = [url]
        study = new_study()
        clip = instances(study)[2]  # 4 frames of 64 x 64
        big = gradient(study)
        big.Rows = big.Columns = 128
        big.PixelData = np.zeros((128, 128), dtype=np.uint8).tobytes()
        del big.SequenceOfUltrasoundRegions
        case_id, _ = stored(engine, settings, clip, big)
        headers = {"Accept": "image/gif", **operations_headers(settings)}
        for target, params, setting in [
            (url_of(case_id, big), {}, "RECORDS_RENDER_MAX_FRAME_PIXELS"),
            (url_of(case_id, clip), {"viewport": "200,200"}, "RECORDS_RENDER_MAX_VIEWPORT_PIXELS"),
            (url_of(case_id, clip), {"viewport": "32,32"}, "RECORDS_RENDER_MAX_ANIMATION_PIXELS"),
        ]:
            got = requests.get(f"{target}/rendered", params=params, headers=headers, timeout=10)
            assert got.status_code == 413 and setting in got.json()["detail"], setting
        three = requests.get(
            f"{url_of(case_id, clip)}/frames/1,2,3/rendered",
            params={"viewport": "32,32"},
            headers=headers,
            timeout=10,
        )
        assert three.ok and Image.open(io.BytesIO(three.content)).n_frames == 3


def test_wado_uri_anonymized_decodes_compressed_frames_to_clean_them(
    engine: Engine, settings: Settings
) -> None:
    """anonymize=yes on an RLE instance with burned-in text: decoded, blanked outside its region, handed out
    as Explicit VR Little Endian (and in no other syntax, so asking for the stored one is a 406)."""
    study = new_study()
    ramp = gradient(study, BurnedInAnnotation="YES")
    [region] = ramp.SequenceOfUltrasoundRegions
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 16  # text may stand above and beside it
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 55, 63
    ramp.compress(pydicom.uid.RLELossless)
    case_id, _ = stored(engine, settings, ramp)
    owner, ours = new_partner()
    tenancy.register_owner(get_engine("auth"), case_id, owner)
    wado = f"{BASE[0]}/dicomweb/wado"

    got = requests.get(
        wado,
        params=wado_params(ramp, contentType="application/dicom", anonymize="yes"),
        headers=ours,
        timeout=10,
    )
    assert got.status_code == 200, got.text
    anonymous = pydicom.dcmread(io.BytesIO(got.content))
    assert anonymous.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert anonymous.BurnedInAnnotation == "NO"
    inside = np.zeros((64, 64), dtype=bool)
    inside[16:64, 8:56] = True
    assert (anonymous.pixel_array[inside] == ramp.pixel_array[inside]).all()
    assert (anonymous.pixel_array[~inside] == 0).all() and (ramp.pixel_array[~inside] != 0).any()
    as_stored = requests.get(
        wado,
        params=wado_params(
            ramp, contentType="application/dicom", anonymize="yes", transferSyntax=pydicom.uid.RLELossless
        ),
        headers=ours,
        timeout=10,
    )
    assert as_stored.status_code == 406 and "1.2.840.10008.1.2.1" in as_stored.json()["detail"]
