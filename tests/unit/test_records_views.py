import pytest

from services.records.adequacy import missing_views


@pytest.mark.parametrize(
    ("exam", "labels", "missing"),
    [
        ("thyroid", ["RT TRANS", "RT SAG", "LT TRANS", "LT LONG", "ISTHMUS"], []),
        ("thyroid", ["RT TRANS", "LT TRANS"], ["right lobe, sagittal", "left lobe, sagittal", "isthmus"]),
        (
            "renal",
            ["Right kidney long", "Right kidney trans", "Bladder"],
            ["left kidney, longitudinal", "left kidney, transverse"],
        ),
        ("obstetric", ["BPD", "AC", "FL", "4CH", "Placenta posterior"], []),
        ("carotid", ["RT CCA", "RT ICA PSV", "LT CCA"], ["left internal carotid"]),
    ],
)
def test_checklist_names_the_views_no_instance_shows(
    exam: str, labels: list[str], missing: list[str]
) -> None:
    assert missing_views(exam, labels) == missing


def test_no_checklist_or_no_labels_is_none() -> None:
    assert missing_views("breast", ["RT 10 O'CLOCK"]) is None
    assert missing_views("pelvic", ["", ""]) is None


def test_a_word_must_start_a_word_of_the_label() -> None:
    # "ac" must not match inside "trachea"; "fl" must not match "flow".
    assert "fetal abdomen (abdominal circumference)" in missing_views("obstetric", ["trachea flow"])  # type: ignore[operator]
