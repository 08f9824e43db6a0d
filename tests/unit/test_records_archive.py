import pytest

from services.records.adequacy import MISSING_CINE, assess, cine_expectation
from services.records.archive import safe_relative_path
from services.records.models import FileKind, RecordFile


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DICOM/IM0001", "DICOM/IM0001"),
        ("CD\\DICOM\\IM1", "CD/DICOM/IM1"),
        ("./a/./b", "a/b"),
        ("../x", None),
        ("a/../../x", None),
        ("/etc/passwd", None),
        ("C:\\Windows\\x", None),
        ("", None),
    ],
)
def test_paths_that_leave_the_root_are_refused(name: str, expected: str | None) -> None:
    assert safe_relative_path(name) == expected


def image(frames: int = 1, regions: bool = True, burned_in: str = "NO") -> RecordFile:
    return RecordFile(
        case_id="c",
        kind=FileKind.DICOM,
        sha256="0" * 64,
        content_type="application/dicom",
        size_bytes=1,
        storage_path="x",
        modality="US",
        number_of_frames=frames,
        has_regions=regions,
        burned_in_annotation=burned_in,
    )


REPORT = RecordFile(
    case_id="c",
    kind=FileKind.REPORT,
    sha256="f" * 64,
    content_type="text/plain",
    size_bytes=1,
    storage_path="x",
)


def test_cine_is_required_for_obstetrics_and_recommended_for_pelvic_exams() -> None:
    assert (cine_expectation("Obstetric"), cine_expectation("pelvic"), cine_expectation("dexa")) == (
        "required",
        "recommended",
        "not_expected",
    )
    assert assess([REPORT, image()], {"exam_type": "obstetric"}).missing == [MISSING_CINE]
    assert assess([REPORT, image(frames=8)], {"exam_type": "obstetric"}).missing == []
    pelvic = assess([REPORT, image()], {"exam_type": "pelvic"})
    assert pelvic.missing == [] and pelvic.warnings == [
        "no cine clip: the second reader sees still images only",
        "the standard pelvic views cannot be checked: no instance names its view "
        "(ViewCodeSequence, ImageComments or SeriesDescription)",
    ]


def test_uncalibrated_and_burned_in_images_are_counted() -> None:
    adequacy = assess([REPORT, image(frames=4, regions=False, burned_in="YES"), image(frames=4)], {})
    assert (adequacy.calibrated_instances, adequacy.burned_in_annotation_instances, adequacy.cine_clips) == (
        1,
        1,
        2,
    )
    assert len(adequacy.warnings) == 2
