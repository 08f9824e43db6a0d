"""Which media type WADO-RS frames are served in for an Accept header (services.records.dicomweb)."""

import pytest

from services.records.dicomweb import _frame_part_type

NATIVE = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"
PREFERRING_JLS = (
    'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80, '
    'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50, '
    'multipart/related; type="application/octet-stream"; transfer-syntax=*'
)


@pytest.mark.parametrize(
    ("accept", "syntax", "compressed", "served"),
    [
        (OHIF, NATIVE, False, "application/octet-stream"),
        (OHIF, JPEG, True, "image/jpeg"),  # transfer-syntax=*: as stored, in its own type
        (PREFERRING_JLS, NATIVE, False, "application/octet-stream"),
        (PREFERRING_JLS, JPEG, True, "image/jpeg"),
        (PREFERRING_JLS, JPEG_LS, True, "image/jls"),
        (
            'multipart/related; type="image/x-dicom-rle"; transfer-syntax=1.2.840.10008.1.2.5',
            RLE,
            True,
            "image/dicom-rle",
        ),
        ("multipart/related; type=image/*", JPEG, True, "image/jpeg"),
        (None, NATIVE, False, "application/octet-stream"),
        ("*/*", JPEG, True, "image/jpeg"),
        # q=0 is "not acceptable"; a higher q wins over the order
        (f"{OHIF};q=0, multipart/related; type=image/jpeg", JPEG, True, "image/jpeg"),
        ('multipart/related; type="image/jpeg"; q=0.5, ' + OHIF, NATIVE, False, "application/octet-stream"),
    ],
)
def test_frames_are_served_in_the_first_range_that_takes_them_as_stored(
    accept: str | None, syntax: str, compressed: bool, served: str
) -> None:
    assert _frame_part_type(accept, syntax, compressed) == served


@pytest.mark.parametrize(
    ("accept", "syntax", "compressed"),
    [
        ('multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50', NATIVE, False),
        ('multipart/related; type="image/jls"', JPEG, True),
        (f"multipart/related; type=application/octet-stream; transfer-syntax={NATIVE}", JPEG, True),
        ("application/dicom+json", NATIVE, False),
        (f"{OHIF};q=0", NATIVE, False),
    ],
)
def test_frames_no_range_takes_as_stored_are_refused(accept: str, syntax: str, compressed: bool) -> None:
    assert _frame_part_type(accept, syntax, compressed) is None
