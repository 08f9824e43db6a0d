"""Matching a case to a specialist: a pure function over the directory and the specialists' open reviews.

Candidates are active, read one of the subspecialties allowed for the exam, are licensed in the patient's
state, are below their open-review limit and are not excluded for the case (e.g. they declined it).
They are ranked by subspecialty preference, then fewest open reviews, then academic centre first, then id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from contracts.commands import MatchSpecialist
from contracts.triage import Reason, Subspecialty, subspecialties_for
from services.review.models import Specialist


@dataclass(frozen=True)
class Assignment:
    specialist: Specialist
    subspecialty: Subspecialty
    explanation: str


@dataclass(frozen=True)
class NoMatch:
    subspecialty: Subspecialty
    reason: str


def preferred_subspecialties(exam_type: str, reason: str, hint: str | None) -> tuple[Subspecialty, ...]:
    """The allowed subspecialties, best first; the intake hint goes first when it is allowed at all."""
    allowed = subspecialties_for(exam_type, reason)
    if hint in allowed:
        return (Subspecialty(hint), *(s for s in allowed if s != hint))
    return allowed


def match_specialist(
    request: MatchSpecialist, specialists: Sequence[Specialist], open_reviews: Mapping[str, int]
) -> Assignment | NoMatch:
    preference = preferred_subspecialties(request.exam.exam_type, request.reason, request.subspecialty_hint)
    state = request.patient.state

    def best_subspecialty(s: Specialist) -> Subspecialty:
        return next(p for p in preference if p in s.subspecialties)

    def load(s: Specialist) -> int:
        return open_reviews.get(s.id, 0)

    readers = [s for s in specialists if s.active and any(p in s.subspecialties for p in preference)]
    licensed = [s for s in readers if state in s.licensed_states]
    allowed = [s for s in licensed if s.id not in request.exclude_reviewers]
    candidates = [s for s in allowed if load(s) < s.max_open_reviews]
    if not candidates:
        return NoMatch(preference[0], _why_unmatched(request, preference, readers, licensed, allowed, load))

    chosen = min(
        candidates, key=lambda s: (preference.index(best_subspecialty(s)), load(s), not s.academic, s.id)
    )
    subspecialty = best_subspecialty(chosen)
    facts = [
        _rule(request, subspecialty) + _preference_note(request, preference, subspecialty),
        f"licensed in {state}",
        f"{load(chosen)} of {chosen.max_open_reviews} open reviews",
    ]
    if chosen.academic:
        facts.append("academic centre")
    facts.append(f"first of {len(candidates)} candidates by subspecialty, load, academic centre")
    return Assignment(chosen, subspecialty, f"{chosen.id}: {'; '.join(facts)}")


def _rule(request: MatchSpecialist, subspecialties: str) -> str:
    if request.reason == Reason.FETAL_ANOMALY:
        return f"reason 'fetal_anomaly' -> {subspecialties}"
    return f"exam '{request.exam.exam_type}' -> {subspecialties}"


def _preference_note(
    request: MatchSpecialist, preference: tuple[Subspecialty, ...], chosen: Subspecialty
) -> str:
    if chosen != preference[0]:
        return f" (no {preference[0]} candidate)"
    if chosen == request.subspecialty_hint and chosen != subspecialties_for(request.exam.exam_type)[0]:
        return " (intake hint)"
    return ""


def _why_unmatched(
    request: MatchSpecialist,
    preference: tuple[Subspecialty, ...],
    readers: list[Specialist],
    licensed: list[Specialist],
    allowed: list[Specialist],
    load: Callable[[Specialist], int],
) -> str:
    wanted = " or ".join(preference)
    state = request.patient.state
    rule = _rule(request, wanted)
    if not readers:
        return f"{rule}, but no active specialist reads {wanted}; add one to the directory"
    if not licensed:
        return (
            f"{rule}, but none of the {len(readers)} active {wanted} specialists is licensed in {state}; "
            "add a specialist licensed there"
        )
    if not allowed:
        excluded = ", ".join(s.id for s in licensed)
        return f"{rule}, but every specialist licensed in {state} is excluded for this case ({excluded})"
    loads = ", ".join(f"{s.id} {load(s)} of {s.max_open_reviews}" for s in allowed)
    return (
        f"{rule}, but every specialist licensed in {state} is at their open-review limit ({loads}); "
        "match again when a review is submitted"
    )
