"""Triage at intake: urgency, subspecialty hint and due date from the request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from contracts.models import Urgency
from contracts.triage import BUSINESS_DAYS_AFTER_RECORDS, Reason, add_business_days, subspecialties_for
from services.common.errors import IntakeRejected

FETAL_EXAMS = {"obstetric", "fetal"}
GESTATIONAL_AGE_WEEKS = (6, 42)


@dataclass(frozen=True)
class Triage:
    urgency: Urgency
    subspecialty: str
    due_at: datetime


def urgency_for(reason: Reason, procedure_scheduled_on: date | None) -> Urgency:
    if reason in (Reason.FETAL_ANOMALY, Reason.INVASIVE_PROCEDURE_PLANNED) or procedure_scheduled_on:
        return Urgency.URGENT
    if reason == Reason.POSSIBLE_MALIGNANCY:
        return Urgency.PRIORITY
    return Urgency.STANDARD


def triage(
    *,
    exam_type: str,
    reason: Reason,
    procedure_scheduled_on: date | None,
    gestational_age_weeks: int | None,
    now: datetime,
) -> Triage:
    """Decide urgency, subspecialty and due date, or reject a request that cannot be served."""
    if procedure_scheduled_on is not None and procedure_scheduled_on <= now.date():
        raise IntakeRejected(
            "procedure_scheduled_on is not in the future; a second opinion "
            "cannot precede a procedure already done. Send the date of the next planned procedure, or omit it."
        )
    if exam_type.lower() in FETAL_EXAMS or reason == Reason.FETAL_ANOMALY:
        low, high = GESTATIONAL_AGE_WEEKS
        if gestational_age_weeks is None:
            raise IntakeRejected(
                "gestational_age_weeks is required for an obstetric or fetal second opinion; send the gestational "
                "age in completed weeks."
            )
        if not low <= gestational_age_weeks <= high:
            raise IntakeRejected(
                f"gestational_age_weeks is outside {low}-{high}; check the value "
                "(completed weeks of gestation)."
            )
    urgency = urgency_for(reason, procedure_scheduled_on)
    if urgency == Urgency.URGENT:
        due_at = now + timedelta(hours=24)
        if procedure_scheduled_on is not None:
            procedure_at = datetime.combine(procedure_scheduled_on, time(0, 0), tzinfo=UTC)
            due_at = min(due_at, procedure_at - timedelta(hours=48))
            if due_at <= now:
                raise IntakeRejected(
                    "the procedure_scheduled_on date is less than 48 hours away; a second "
                    "opinion cannot be guaranteed before it. Postpone the procedure or call the programme."
                )
    else:
        # Provisional: the workflow moves it when records complete later (the clock starts at complete records).
        due_at = add_business_days(now, BUSINESS_DAYS_AFTER_RECORDS[urgency.value])
    return Triage(urgency=urgency, subspecialty=subspecialties_for(exam_type, reason)[0].value, due_at=due_at)
