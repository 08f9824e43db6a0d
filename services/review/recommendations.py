"""A recommendation as radiologists write it: free text, optionally with a structured follow-up (what, and
when), as the ACR incidental-findings, O-RADS US and ACR TI-RADS management sections phrase theirs:
"Follow-up pelvic ultrasound in 6-12 weeks", "MRI pelvis now", "FNA of nodule 1".

A recommendation is either a plain string (what stored reviews and older clients hold) or a
`Recommendation`; both stay valid wherever findings are read or written.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator

FollowUpAction = Literal[
    "ultrasound", "mri", "ct", "mammography", "biopsy", "laboratory", "referral", "clinical_follow_up"
]
IntervalUnit = Literal["now", "days", "weeks", "months", "years"]

ACTION_LABELS: dict[str, str] = {
    "ultrasound": "ultrasound",
    "mri": "MRI",
    "ct": "CT",
    "mammography": "mammography",
    "biopsy": "biopsy",
    "laboratory": "laboratory tests",
    "referral": "referral",
    "clinical_follow_up": "clinical follow-up",
}
# The longest intervals a follow-up is given in (TI-RADS and incidental-findings surveillance reach 5 years).
MAX_VALUE = {"days": 365, "weeks": 104, "months": 60, "years": 10}

RecommendationText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1_000)]


class FollowUpInterval(BaseModel):
    """When: `{"unit": "now"}`, or `value` (to `up_to`, for a range such as 6-12 weeks) days/weeks/months/years."""

    model_config = ConfigDict(extra="forbid")

    unit: IntervalUnit
    value: int | None = Field(default=None, description="how many units; required unless the unit is 'now'")
    up_to: int | None = Field(default=None, description="the upper end of a range, e.g. 12 in '6-12 weeks'")

    @model_validator(mode="after")
    def is_a_positive_interval(self) -> FollowUpInterval:
        if self.unit == "now":
            if self.value is not None or self.up_to is not None:
                raise ValueError(
                    "'now' takes no value; give a unit of days, weeks, months or years for an interval"
                )
            return self
        if self.value is None or self.value < 1:
            raise ValueError(f"an interval in {self.unit} needs a positive value (e.g. 6)")
        if self.value > MAX_VALUE[self.unit]:
            raise ValueError(f"at most {MAX_VALUE[self.unit]} {self.unit}")
        if self.up_to is not None and not self.value < self.up_to <= MAX_VALUE[self.unit]:
            raise ValueError(
                f"up_to ends the range: more than value ({self.value}), at most {MAX_VALUE[self.unit]} {self.unit}"
            )
        return self

    def __str__(self) -> str:
        if self.unit == "now":
            return "now"
        assert self.value is not None  # checked above
        amount = f"{self.value}–{self.up_to}" if self.up_to else str(self.value)
        unit = self.unit[:-1] if amount == "1" else self.unit
        return f"in {amount} {unit}"


class FollowUp(BaseModel):
    """What to do next and when."""

    model_config = ConfigDict(extra="forbid")

    action: FollowUpAction
    when: FollowUpInterval

    def __str__(self) -> str:
        return f"{ACTION_LABELS[self.action]} {self.when}"


class Recommendation(BaseModel):
    """A recommendation with an optional structured follow-up; `text` may be left out when `follow_up` says it all."""

    model_config = ConfigDict(extra="forbid")

    text: RecommendationText | None = None
    follow_up: FollowUp | None = None

    @model_validator(mode="after")
    def says_something(self) -> Recommendation:
        if self.text is None and self.follow_up is None:
            raise ValueError("a recommendation needs its text, a follow_up, or both")
        return self


def _kind(value: object) -> str:
    return "text" if isinstance(value, str) else "structured"


# A string is a plain recommendation, anything else a structured one: a 422 then names only that shape's fields.
RecommendationItem = Annotated[
    Annotated[RecommendationText, Tag("text")] | Annotated[Recommendation, Tag("structured")],
    Discriminator(_kind),
]


def describe(item: str | Recommendation) -> str:
    """One line for the report: the text, then the follow-up in a fixed form ("... (MRI in 6-12 weeks)")."""
    if isinstance(item, str):
        return item
    if item.follow_up is None:
        return item.text or ""
    if item.text is None:
        phrase = str(item.follow_up)
        return f"{phrase[0].upper()}{phrase[1:]}."
    return f"{item.text.rstrip('.')} ({item.follow_up})."
