"""bench.db_work turns two reads of PostgreSQL's table statistics into the rows each service wrote."""

from __future__ import annotations

from bench.db_work import by_schema, describe, difference

BEFORE = {
    "intake.cases": (10, 40, 0),
    "intake.inbox": (100, 0, 0),
    "review.outbox": (5, 5, 0),
    "auth.api_keys": (3, 0, 0),
}
AFTER = {
    "intake.cases": (12, 63, 0),
    "intake.inbox": (126, 0, 0),
    "review.outbox": (15, 15, 2),
    "auth.api_keys": (3, 0, 0),
    "records.record_files": (10, 0, 0),  # a table the first read did not list
}


def test_the_difference_keeps_only_the_tables_that_changed() -> None:
    assert difference(BEFORE, AFTER) == {
        "intake.cases": (2, 23, 0),
        "intake.inbox": (26, 0, 0),
        "review.outbox": (10, 10, 2),
        "records.record_files": (10, 0, 0),
    }


def test_tables_add_up_per_service_schema() -> None:
    assert by_schema(difference(BEFORE, AFTER)) == {
        "intake": (28, 23, 0),
        "review": (10, 10, 2),
        "records": (10, 0, 0),
    }


def test_the_description_puts_the_busiest_schema_and_table_first() -> None:
    text = describe(difference(BEFORE, AFTER), top=2)
    assert (
        text
        == "intake 28/23/0, review 10/10/2, records 10/0/0; most: intake.inbox 26/0/0, intake.cases 2/23/0"
    )
    assert describe({}) == "no rows written"
