"""Which decoder reads which pixel data. GDCM (python-gdcm) is installed for JPEG Lossless (process 14), which no
other decoder here reads; pydicom would try it first for the other JPEG syntaxes too, so the rendering module
puts it last there: Pillow and pyjpegls still decode what they decoded before GDCM came."""

from __future__ import annotations

import pydicom
import pydicom.pixels
import pydicom.uid

from services.records import rendering


def test_jpeg_lossless_has_a_decoder_and_what_has_none_is_told_apart() -> None:
    for syntax in (pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1):
        assert rendering.decodable(syntax), syntax.name
        assert "gdcm" in pydicom.pixels.get_decoder(syntax).available_plugins
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.JPEGLSLossless, pydicom.uid.RLELossless):
        assert rendering.decodable(syntax), syntax.name
    for syntax in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.4.110", "1.2.3.4"):
        assert not rendering.decodable(pydicom.uid.UID(syntax)), syntax  # HTJ2K, no pydicom decoder, unknown


def test_the_decoders_used_before_gdcm_came_are_tried_first_and_gdcm_last() -> None:
    """pydicom lists GDCM first for every JPEG syntax it takes. Their output is the same on the frames tried
    (JPEG Baseline 4:4:4, 4:2:2, 4:2:0 and grey, lossy JPEG 2000: not one value apart), and both refuse a
    truncated or damaged frame; the order is kept so that what decoded a frame before decodes it still."""
    first = {
        pydicom.uid.JPEGBaseline8Bit: "pillow",
        pydicom.uid.JPEGExtended12Bit: "pillow",
        pydicom.uid.JPEGLSLossless: "pyjpegls",
        pydicom.uid.JPEGLSNearLossless: "pyjpegls",
        pydicom.uid.JPEG2000Lossless: "pillow",
        pydicom.uid.JPEG2000: "pillow",
    }
    assert set(first) == set(rendering.DECODED_BEFORE_GDCM)
    for syntax, plugin in first.items():
        # The order pydicom tries them in: no public API shows it (available_plugins is sorted).
        order = list(pydicom.pixels.get_decoder(syntax)._validate_plugins())
        assert order == [plugin, "gdcm"], (syntax.name, order)
    rendering.put_gdcm_last()  # run twice (a reload): the same order
    assert list(pydicom.pixels.get_decoder(pydicom.uid.JPEGBaseline8Bit)._validate_plugins()) == [
        "pillow",
        "gdcm",
    ]
