from datetime import UTC, date, datetime, timedelta

import pytest

from contracts.models import Urgency
from contracts.triage import Reason, add_business_days
from services.common.errors import IntakeRejected
from services.intake.triage import triage

FRIDAY = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("exam_type", "reason", "procedure", "ga", "urgency", "subspecialty", "due"),
    [
        ("pelvic", Reason.UNCLEAR_REPORT, None, None, Urgency.STANDARD, "gynecologic_imaging", FRIDAY + timedelta(days=7)),
        ("breast", Reason.POSSIBLE_MALIGNANCY, None, None, Urgency.PRIORITY, "breast_imaging", FRIDAY + timedelta(days=4)),
        ("obstetric", Reason.FETAL_ANOMALY, None, 22, Urgency.URGENT, "maternal_fetal_medicine", FRIDAY + timedelta(hours=24)),
        ("pelvic", Reason.FETAL_ANOMALY, None, 20, Urgency.URGENT, "maternal_fetal_medicine", FRIDAY + timedelta(hours=24)),
        ("carotid", Reason.VASCULAR_FINDING, None, None, Urgency.STANDARD, "vascular", FRIDAY + timedelta(days=7)),
        # A procedure on Monday: due 48 h before it, which is earlier than the 24 h default.
        ("thyroid", Reason.INVASIVE_PROCEDURE_PLANNED, date(2026, 11, 30), None, Urgency.URGENT,
         "neuroradiology_head_neck", datetime(2026, 11, 28, 0, 0, tzinfo=UTC)),
        ("thyroid", Reason.INVASIVE_PROCEDURE_PLANNED, date(2026, 12, 10), None, Urgency.URGENT,
         "neuroradiology_head_neck", FRIDAY + timedelta(hours=24)),
    ],
)  # fmt: skip
def test_triage_sets_urgency_subspecialty_and_due_date(
    exam_type, reason, procedure, ga, urgency, subspecialty, due
):
    decided = triage(
        exam_type=exam_type,
        reason=reason,
        procedure_scheduled_on=procedure,
        gestational_age_weeks=ga,
        now=FRIDAY,
    )
    assert (decided.urgency, decided.subspecialty, decided.due_at) == (urgency, subspecialty, due)


def test_due_date_is_never_later_than_48_hours_before_the_procedure():
    decided = triage(
        exam_type="thyroid",
        reason=Reason.INVASIVE_PROCEDURE_PLANNED,
        procedure_scheduled_on=date(2026, 11, 30),
        gestational_age_weeks=None,
        now=datetime(2026, 11, 27, 6, 0, tzinfo=UTC),
    )
    assert decided.due_at == datetime(2026, 11, 28, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("procedure", "ga", "exam", "message"),
    [
        (date(2026, 11, 20), None, "pelvic", "not in the future"),
        (date(2026, 11, 28), None, "pelvic", "not in the future"),
        (date(2026, 11, 29), None, "pelvic", "less than 48 hours away"),
        (None, None, "obstetric", "gestational_age_weeks is required"),
        (None, 44, "obstetric", "outside 6-42"),
        (None, 3, "fetal", "outside 6-42"),
    ],
)
def test_requests_that_cannot_be_served_are_rejected_with_the_reason(procedure, ga, exam, message):
    with pytest.raises(IntakeRejected, match=message):
        triage(
            exam_type=exam,
            reason=Reason.DOUBTS_ABOUT_FIRST_SCAN,
            procedure_scheduled_on=procedure,
            gestational_age_weeks=ga,
            now=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        )


def test_business_days_skip_weekends():
    assert add_business_days(FRIDAY, 1) == FRIDAY + timedelta(days=3)
    assert add_business_days(FRIDAY - timedelta(days=4), 2) == FRIDAY - timedelta(days=2)
