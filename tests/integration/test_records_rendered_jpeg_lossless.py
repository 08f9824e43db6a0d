"""JPEG Lossless (process 14: SV1, 1.2.840.10008.1.2.4.70, and any predictor, .57), as some ultrasound carts
and PACS send it, rendered by records as its uncompressed original is: `/rendered` (PNG pixel for pixel, the
frames of a cine), thumbnails (cut to the ultrasound regions), WADO-URI, and 12- and 16-bit values windowed as
stored. The instances are compressed by dcmtk's `dcmcjpeg`, as a modality's or an archive's would be, and stored
beside their originals through STOW-RS. A syntax no decoder here reads is still a 406 saying what to do."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest
import requests
from PIL import Image

from services.common.config import Settings
from tests.dicom_factory import make_us_instance
from tests.integration import test_records_rendered as rendered
from tests.integration.test_records_dicomweb import new_study
from tests.keys import operations_headers

# The rendered tests' records service, its engine and base URL (one server for this module).
engine, base_url, _base = rendered.engine, rendered.base_url, rendered._base
decoded, linear, row_of, url_of, wado_params = (
    rendered.decoded, rendered.linear, rendered.row_of, rendered.url_of, rendered.wado_params,
)  # fmt: skip
SV1, PROCESS_14 = pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLossless
DCMCJPEG = {SV1: ["+e1"], PROCESS_14: ["+el", "+sv", "1"]}  # predictor 1 (.57): SV1 is predictor 1 in .70


def us_image(study: str, frames: int = 1, **attributes: Any) -> pydicom.Dataset:
    """A synthetic ultrasound instance (8-bit MONOCHROME2 noise, one ultrasound region over all of it)."""
    ds = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=frames))
    )
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def compressed(original: pydicom.Dataset, syntax: str, folder: Path) -> pydicom.Dataset:
    """`original` compressed by dcmcjpeg into `syntax`, as a new instance of its series."""
    plain, packed = folder / f"{original.SOPInstanceUID}.dcm", folder / f"{original.SOPInstanceUID}.jpll.dcm"
    original.save_as(plain, enforce_file_format=True)
    subprocess.run(
        ["dcmcjpeg", *DCMCJPEG[syntax], str(plain), str(packed)], check=True, capture_output=True, timeout=60
    )
    packed_ds = pydicom.dcmread(packed)
    assert packed_ds.file_meta.TransferSyntaxUID == syntax
    assert packed_ds.PixelData != original.PixelData  # encapsulated JPEG, not the native frames
    packed_ds.SOPInstanceUID = packed_ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return packed_ds


def get(url: str, settings: Settings, accept: str = "image/png", **params: str) -> requests.Response:
    return requests.get(
        url, params=params, headers={"Accept": accept, **operations_headers(settings)}, timeout=30
    )


@pytest.mark.parametrize("syntax", [SV1, PROCESS_14], ids=["sv1-4.70", "process14-4.57"])
def test_a_jpeg_lossless_image_renders_as_its_uncompressed_original_pixel_for_pixel(
    engine: Any, settings: Settings, tmp_path: Path, syntax: str
) -> None:
    study = new_study()
    grey = us_image(study)
    rgb = us_image(study, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    rgb.PixelData = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()
    packed = [compressed(grey, syntax, tmp_path), compressed(rgb, syntax, tmp_path)]
    case_id, _ = rendered.stored(engine, settings, grey, rgb, *packed)

    for original, jpll in zip((grey, rgb), packed, strict=True):
        want = get(f"{url_of(case_id, original)}/rendered", settings)
        got = get(f"{url_of(case_id, jpll)}/rendered", settings)
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "image/png"
        assert (decoded(got.content) == decoded(want.content)).all()  # lossless: exactly
        stored_pixels = np.frombuffer(original.PixelData, dtype=np.uint8)
        assert (decoded(got.content).ravel() == stored_pixels).all()  # the stored values, no window on 8 bits
        jpeg = get(f"{url_of(case_id, jpll)}/frames/1/rendered", settings, accept="image/jpeg")
        assert jpeg.status_code == 200 and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"

    series = get(
        f"{rendered.root_of(case_id)}/studies/{study}/series/{grey.SeriesInstanceUID}/rendered",
        settings,
        accept='multipart/related; type="image/png"',
    )
    assert series.status_code == 200 and "warning" not in series.headers  # none left out
    assert series.content.count(b"Content-Type: image/png") == 4


def test_a_jpeg_lossless_cine_renders_frame_by_frame_and_animates(
    engine: Any, settings: Settings, tmp_path: Path
) -> None:
    study = new_study()
    cine = us_image(study, frames=4)  # Frame Time 33.3 ms
    jpll = compressed(cine, SV1, tmp_path)
    case_id, _ = rendered.stored(engine, settings, cine, jpll)
    frames = np.frombuffer(cine.PixelData, dtype=np.uint8).reshape(4, 64, 64)

    third = get(f"{url_of(case_id, jpll)}/frames/3/rendered", settings)
    assert third.status_code == 200, third.text
    assert (decoded(third.content) == frames[2]).all()
    gif = get(f"{url_of(case_id, jpll)}/rendered", settings, accept="image/gif")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    animated = Image.open(io.BytesIO(gif.content))
    assert animated.n_frames == 4 and abs(animated.info["duration"] - 33.3) <= 10
    for index in range(4):
        animated.seek(index)
        assert (np.asarray(animated.convert("L")) == frames[index]).all(), index

    wado = f"{rendered.BASE[0]}/dicomweb/wado"
    headers = operations_headers(settings)
    second = requests.get(
        wado, params=wado_params(jpll, contentType="image/png", frameNumber="2"), headers=headers, timeout=30
    )
    assert second.status_code == 200 and (decoded(second.content) == frames[1]).all()
    animated_wado = requests.get(
        wado, params=wado_params(jpll, contentType="image/gif"), headers=headers, timeout=30
    )
    assert animated_wado.ok and Image.open(io.BytesIO(animated_wado.content)).n_frames == 4
    # No contentType: an image is a JPEG (a frame no decoder read was handed out as application/dicom).
    default = requests.get(wado, params=wado_params(jpll), headers=headers, timeout=30)
    assert default.status_code == 200 and default.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(default.content)).size == (64, 64)


def test_thumbnails_of_jpeg_lossless_are_cut_to_the_ultrasound_regions_as_the_originals_are(
    engine: Any, settings: Settings, tmp_path: Path
) -> None:
    study = new_study()
    burned_in = us_image(study, BurnedInAnnotation="YES")
    region = burned_in.SequenceOfUltrasoundRegions[0]
    region.RegionLocationMinX0, region.RegionLocationMaxX1 = 16, 47  # text may be left and right of it
    jpll = compressed(burned_in, SV1, tmp_path)
    case_id, _ = rendered.stored(engine, settings, burned_in, jpll)

    for path in ("/thumbnail", "/frames/1/thumbnail"):
        want = get(f"{url_of(case_id, burned_in)}{path}", settings)
        got = get(f"{url_of(case_id, jpll)}{path}", settings)
        assert got.status_code == 200, (path, got.text)
        assert Image.open(io.BytesIO(got.content)).size == (64, 128), path  # 32 x 64 of image, fit in 128
        assert (decoded(got.content) == decoded(want.content)).all(), path
    study_thumbnail = get(
        f"{rendered.root_of(case_id)}/studies/{study}/thumbnail", settings, accept="image/jpeg"
    )
    assert study_thumbnail.status_code == 200 and study_thumbnail.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg_lossless_12_and_16_bit_values_are_windowed_as_stored(
    engine: Any, settings: Settings, tmp_path: Path, bits: int
) -> None:
    """Not cut to 8 bits before the VOI: the window spreads the whole stored range over the grey levels."""
    study = new_study()
    top = (1 << bits) - 1
    values = np.linspace(0, top, 64).round().astype(np.uint16)  # a ramp over the whole stored range
    deep = us_image(study, BitsAllocated=16, BitsStored=bits, HighBit=bits - 1)
    deep.PixelData = np.tile(values, (64, 1)).astype("<u2").tobytes()
    deep["PixelData"].VR = "OW"
    own = us_image(study, BitsAllocated=16, BitsStored=bits, HighBit=bits - 1)  # its own window
    own.PixelData = deep.PixelData
    own["PixelData"].VR = "OW"
    own.WindowCenter, own.WindowWidth = (top + 1) / 4, (top + 1) / 2
    packed = [compressed(deep, SV1, tmp_path), compressed(own, SV1, tmp_path)]
    case_id, _ = rendered.stored(engine, settings, deep, own, *packed)
    center, width = (top + 1) / 2, top + 1

    asked = get(f"{url_of(case_id, packed[0])}/rendered", settings, window=f"{center},{width},linear")
    assert asked.status_code == 200, asked.text
    assert np.abs(row_of(decoded(asked.content)) - linear(values, center, width)).max() <= 1
    assert len(set(row_of(decoded(asked.content)))) == 64  # every step of the ramp its own grey level
    natural = get(f"{url_of(case_id, packed[0])}/rendered", settings)  # no window: the stored range
    assert row_of(decoded(natural.content))[0] == 0 and row_of(decoded(natural.content))[-1] == 255
    own_window = row_of(decoded(get(f"{url_of(case_id, packed[1])}/rendered", settings).content))
    assert own_window[32] == 255 > own_window[15] > 0  # its window spans 0 to top / 2
    wado = requests.get(
        f"{rendered.BASE[0]}/dicomweb/wado",
        params=wado_params(
            packed[0], contentType="image/png", windowCenter=str(center), windowWidth=str(width)
        ),
        headers=operations_headers(settings),
        timeout=30,
    )
    for original, jpll, params in [
        (deep, packed[0], {"window": f"{center},{width},linear"}),
        (deep, packed[0], {}),
        (own, packed[1], {}),
    ]:
        want = get(f"{url_of(case_id, original)}/rendered", settings, **params)
        got = get(f"{url_of(case_id, jpll)}/rendered", settings, **params)
        assert (decoded(got.content) == decoded(want.content)).all(), params
    assert wado.status_code == 200 and (decoded(wado.content) == decoded(asked.content)).all()


def test_a_syntax_no_decoder_here_reads_is_a_406_saying_to_retrieve_the_frames_as_stored(
    engine: Any, settings: Settings
) -> None:
    """HTJ2K (pydicom decodes it with pylibjpeg alone, not installed) and Encapsulated Uncompressed (no decoder
    in pydicom at all: it was a 500)."""
    study = new_study()
    unreadable = []
    for syntax in (pydicom.uid.HTJ2KLossless, pydicom.uid.UID("1.2.840.10008.1.2.1.98")):
        ds = us_image(study)
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        unreadable.append(ds)
    case_id, _ = rendered.stored(engine, settings, *unreadable)
    wado = f"{rendered.BASE[0]}/dicomweb/wado"
    headers = operations_headers(settings)
    for ds in unreadable:
        name = ds.file_meta.TransferSyntaxUID.name
        for path in ("/rendered", "/frames/1/rendered", "/thumbnail"):
            got = get(f"{url_of(case_id, ds)}{path}", settings)
            assert got.status_code == 406, (name, path, got.status_code)
            assert f"no decoder here for {name}" in got.json()["detail"], (name, path)
            assert "retrieve the frames as stored" in got.json()["detail"], (name, path)
        as_image = requests.get(
            wado, params=wado_params(ds, contentType="image/png"), headers=headers, timeout=30
        )
        assert as_image.status_code == 406 and "retrieve the frames as stored" in as_image.json()["detail"]
        as_stored = requests.get(wado, params=wado_params(ds), headers=headers, timeout=30)
        assert as_stored.status_code == 200 and as_stored.headers["content-type"] == "application/dicom"
