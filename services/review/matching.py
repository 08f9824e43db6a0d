"""Matching a case to a specialist: a pure function over the directory and the specialists' open reviews.

Candidates are active, read one of the subspecialties the rules table allows for the exam, are licensed in
the patient's state, are not excluded for the case (they declined it or let the offer expire), have no
conflict of interest (they are not the first reader and not in the first reader's group), are not out of
office between now and the due date, and are below their open-review limit.
A specialist named by operations (a reassignment) is taken when they are a candidate.
They are ranked by subspecialty preference, then in the patient's payer network first, then academic
centre first, then fewest open reviews, then id. The explanation names the rule and the facts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from contracts.commands import MatchSpecialist
from contracts.triage import Reason, Subspecialty, subspecialties_for
from services.review.models import Specialist, as_utc


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


def conflict_of_interest(request: MatchSpecialist, s: Specialist) -> str | None:
    exam = request.exam
    if exam.first_reader_npi and s.npi == exam.first_reader_npi:
        return "is the first reader"
    if exam.first_reader_organization and _same(s.organization, exam.first_reader_organization):
        return "is in the first reader's group"
    if _same(s.organization, exam.facility):
        return "works where the first scan was performed"
    return None


def in_network(request: MatchSpecialist, s: Specialist) -> bool:
    return bool(request.plan_code) and request.plan_code in s.payer_networks


def match_specialist(
    request: MatchSpecialist,
    specialists: Sequence[Specialist],
    open_reviews: Mapping[str, int],
    now: datetime | None = None,
) -> Assignment | NoMatch:
    preference = preferred_subspecialties(request.exam.exam_type, request.reason, request.subspecialty_hint)
    state = request.patient.state
    window = (as_utc(now or request.due_at).date(), as_utc(request.due_at).date())

    def best_subspecialty(s: Specialist) -> Subspecialty:
        return next(p for p in preference if p in s.subspecialties)

    def load(s: Specialist) -> int:
        return open_reviews.get(s.id, 0)

    readers = [s for s in specialists if s.active and any(p in s.subspecialties for p in preference)]
    licensed = [s for s in readers if state in s.licensed_states]
    allowed = [s for s in licensed if s.id not in request.exclude_reviewers]
    free = [s for s in allowed if conflict_of_interest(request, s) is None]
    available = [s for s in free if s.away_between(*window) is None]
    candidates = [s for s in available if load(s) < s.max_open_reviews]
    if not candidates:
        stages = _Stages(readers, licensed, allowed, free, available)
        return NoMatch(preference[0], _why_unmatched(request, preference, stages, load, window))

    named = [s for s in candidates if s.id == request.preferred_reviewer]
    chosen = (
        named[0]
        if named
        else min(
            candidates,
            key=lambda s: (
                preference.index(best_subspecialty(s)),
                not in_network(request, s),
                not s.academic,
                load(s),
                s.id,
            ),
        )
    )
    subspecialty = best_subspecialty(chosen)
    facts = [
        _rule(request, subspecialty) + _preference_note(request, preference, subspecialty),
        f"licensed in {state}",
        f"{load(chosen)} of {chosen.max_open_reviews} open reviews",
    ]
    if chosen.academic:
        facts.append("academic centre")
    facts.append(_network_fact(request, chosen))
    facts.append("no conflict of interest")
    facts.append(f"available until the due date {window[1].isoformat()}")
    if named:
        facts.append("named by operations when reassigning")
    else:
        if request.preferred_reviewer:
            facts.append(f"{request.preferred_reviewer}, named by operations, is not a candidate")
        facts.append(f"first of {len(candidates)} candidates by subspecialty, network, academic centre, load")
    return Assignment(chosen, subspecialty, f"{chosen.id}: {'; '.join(facts)}")


@dataclass(frozen=True)
class _Stages:
    readers: list[Specialist]
    licensed: list[Specialist]
    allowed: list[Specialist]
    free: list[Specialist]
    available: list[Specialist]


def _same(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def _network_fact(request: MatchSpecialist, s: Specialist) -> str:
    if not request.plan_code:
        return "no payer plan to check the network against"
    return f"{'in' if in_network(request, s) else 'out of'} network for {request.plan_code}"


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
    stages: _Stages,
    load: Callable[[Specialist], int],
    window: tuple[date, date],
) -> str:
    wanted = " or ".join(preference)
    state = request.patient.state
    rule = _rule(request, wanted)
    if not stages.readers:
        return f"{rule}, but no active specialist reads {wanted}; add one to the directory"
    if not stages.licensed:
        return (
            f"{rule}, but none of the {len(stages.readers)} active {wanted} specialists is licensed in "
            f"{state}; add a specialist licensed there"
        )
    if not stages.allowed:
        excluded = ", ".join(s.id for s in stages.licensed)
        return f"{rule}, but every specialist licensed in {state} is excluded for this case ({excluded})"
    if not stages.free:
        conflicts = ", ".join(f"{s.id} {conflict_of_interest(request, s)}" for s in stages.allowed)
        return f"{rule}, but every remaining specialist has a conflict of interest ({conflicts})"
    if not stages.available:
        away = ", ".join(s.id for s in stages.free)
        return (
            f"{rule}, but every remaining specialist is out of office before the due date "
            f"{window[1].isoformat()} ({away})"
        )
    loads = ", ".join(f"{s.id} {load(s)} of {s.max_open_reviews}" for s in stages.available)
    return (
        f"{rule}, but every specialist licensed in {state} is at their open-review limit ({loads}); "
        "match again when a review is submitted"
    )
