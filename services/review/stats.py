"""Quality data for the programme's meetings: concordance and turnaround per subspecialty and per reviewer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from statistics import median

from pydantic import BaseModel

from services.review.models import Review, as_utc


class QualityFigures(BaseModel):
    key: str
    submitted: int
    concordant: int
    minor_discrepancy: int
    major_discrepancy: int
    concordance_rate: float
    median_turnaround_hours: float
    declined: int
    withdrawn: int


class ReviewStats(BaseModel):
    by_subspecialty: list[QualityFigures]
    by_reviewer: list[QualityFigures]


def review_stats(reviews: Iterable[Review]) -> ReviewStats:
    by_subspecialty: dict[str, list[Review]] = defaultdict(list)
    by_reviewer: dict[str, list[Review]] = defaultdict(list)
    for review in reviews:
        by_subspecialty[review.subspecialty].append(review)
        by_reviewer[review.reviewer_id].append(review)
    return ReviewStats(
        by_subspecialty=[_figures(k, v) for k, v in sorted(by_subspecialty.items())],
        by_reviewer=[_figures(k, v) for k, v in sorted(by_reviewer.items())],
    )


def _figures(key: str, reviews: list[Review]) -> QualityFigures:
    submitted = [r for r in reviews if r.status == "submitted" and r.submitted_at is not None]
    agreements = [r.agreement for r in submitted]
    # Turnaround runs from the offer to the signed review: the time the referring physician waits on us.
    hours = [
        (as_utc(r.submitted_at) - as_utc(r.assigned_at)).total_seconds() / 3600
        for r in submitted
        if r.submitted_at is not None
    ]
    return QualityFigures(
        key=key,
        submitted=len(submitted),
        concordant=agreements.count("concordant"),
        minor_discrepancy=agreements.count("minor_discrepancy"),
        major_discrepancy=agreements.count("major_discrepancy"),
        concordance_rate=round(agreements.count("concordant") / len(submitted), 3) if submitted else 0.0,
        median_turnaround_hours=round(median(hours), 2) if hours else 0.0,
        declined=sum(r.status == "declined" for r in reviews),
        withdrawn=sum(r.status == "withdrawn" for r in reviews),
    )
