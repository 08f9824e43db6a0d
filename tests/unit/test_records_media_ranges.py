"""The Accept header as every DICOMweb answer reads it (instances, frames, rendered images, video)."""

from services.records.dicomweb import media_ranges


def test_ranges_come_most_wanted_first_and_a_refused_type_is_left_out() -> None:
    header = 'image/png;q=0.5, multipart/related; type="image/jpeg", application/dicom;q=0, */*;q=0.1'
    assert media_ranges(header) == [
        ("multipart/related", {"type": "image/jpeg"}),
        ("image/png", {"q": "0.5"}),
        ("*/*", {"q": "0.1"}),
    ]


def test_no_header_accepts_all_and_an_unreadable_q_counts_as_one() -> None:
    assert media_ranges(None) == [("*/*", {})]
    assert media_ranges("IMAGE/GIF;q=x, image/png") == [("image/gif", {"q": "x"}), ("image/png", {})]
