"""When each frame of a cine stored as frames is shown in its WebM (webm.py): PS3.3 C.7.6.5's Frame Time
Vector, Frame Time, Cine Rate, Recommended Display Frame Rate, else 25 a second."""

from __future__ import annotations

from fractions import Fraction

from pydicom.dataset import Dataset

from services.records.webm import cine_times


def header(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_a_frame_time_vector_times_each_frame_from_the_one_before() -> None:
    times = cine_times(header(FrameTimeVector=[0, 40, 40, 100], FrameTime=33.3), 4)
    assert times == [0, Fraction(40, 1000), Fraction(80, 1000), Fraction(180, 1000)]


def test_a_vector_that_does_not_fit_gives_way_to_frame_time_then_the_rates() -> None:
    assert cine_times(header(FrameTimeVector=[0, 40], FrameTime=50), 3) == [
        0,
        Fraction(1, 20),
        Fraction(1, 10),
    ]
    assert cine_times(header(FrameTimeVector=[0, 0, 40], FrameTime=50), 3)[1] == Fraction(1, 20)
    assert cine_times(header(CineRate=30, RecommendedDisplayFrameRate=10), 2) == [0, Fraction(1, 30)]
    assert cine_times(header(RecommendedDisplayFrameRate=10), 2) == [0, Fraction(1, 10)]
    assert cine_times(header(), 3) == [0, Fraction(1, 25), Fraction(2, 25)]
