"""What keeps a case that waits for months within Temporal's limits: its reminder schedules, and queries that
return the beginning and the latest of a list the case keeps growing (pure functions of the workflow's state)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from contracts import CaseStatus
from workflows.case import CaseWorkflow, communication_reminder_interval, rematch_interval
from workflows.models import AlertRecord, TimelineItem

HOUR = timedelta(hours=1)
START = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_report_waiting_a_year_for_the_communication_reminds_about_400_times() -> None:
    waits, elapsed = [], timedelta(0)
    while elapsed < timedelta(days=365):
        waits.append(communication_reminder_interval(len(waits)))
        elapsed += waits[-1]
    assert waits[:9] == [HOUR] * 8 + [4 * HOUR]
    assert sum(waits[:48], timedelta(0)) == timedelta(days=7)  # every 4 hours to the end of the 7th day
    assert set(waits[48:]) == {timedelta(days=1)}
    assert len(waits) == 406  # 6 history events each: ~2,400, not 52,560 (hourly), in a year


def test_an_unmatched_case_waits_longer_each_time_up_to_six_hours() -> None:
    assert [rematch_interval(HOUR, n) / HOUR for n in range(1, 7)] == [1, 2, 4, 6, 6, 6]
    assert rematch_interval(HOUR, 10_000) == 6 * HOUR  # no overflow however long it waits
    assert rematch_interval(12 * HOUR, 3) == 12 * HOUR  # a policy that waits longer keeps its own


def test_queries_return_the_first_100_and_the_latest_399_of_a_long_timeline() -> None:
    case = CaseWorkflow()
    case._timeline = [
        TimelineItem(
            status=CaseStatus.AWAITING_COMMUNICATION, at=START + n * HOUR, detail=f"line {n}", kind="note"
        )
        for n in range(1_000)
    ]
    case._alerts = [
        AlertRecord(kind="communication_reminder", at=START + n * HOUR, detail=f"reminder {n}")
        for n in range(600)
    ]
    timeline = case.timeline()
    assert len(timeline) == 500
    assert [t.detail for t in timeline[:100]] == [f"line {n}" for n in range(100)]
    assert timeline[100].detail.startswith(
        "501 items left out here (a query shows the first 100 and the latest 399)"
    )
    assert (
        timeline[100].at == START + 100 * HOUR and timeline[100].status == CaseStatus.AWAITING_COMMUNICATION
    )
    assert [t.detail for t in timeline[101:]] == [f"line {n}" for n in range(601, 1_000)]
    alerts = case.alerts()
    assert len(alerts) == 500 and alerts[100].kind == "left_out" and alerts[-1].detail == "reminder 599"
    case._timeline = case._timeline[:500]
    assert case.timeline() == case._timeline  # up to 500 items, all of them
