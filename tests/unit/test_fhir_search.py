"""How a FHIR search value is read (services.common.fhir_search): a date's prefix against the range its precision
covers, tokens, references, and what is refused (naming the parameter, never the value)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.common.fhir_params import TASK_PARAMS
from services.common.fhir_search import (
    SearchRefused,
    Token,
    read_date,
    read_reference,
    read_search,
    read_token,
)


@pytest.mark.parametrize(
    ("sent", "prefix", "start", "end"),
    [
        ("2026", "eq", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("ge2026-12", "ge", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("lt2026-02-28", "lt", datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
        ("gt2026-12-07T10:00+01:00", "gt", datetime(2026, 12, 7, 9, tzinfo=UTC), datetime(2026, 12, 7, 9, 1, tzinfo=UTC)),
        ("2026-12-07T10:00:00 01:00", "eq", datetime(2026, 12, 7, 9, tzinfo=UTC), datetime(2026, 12, 7, 9, 0, 1, tzinfo=UTC)),
        ("sa9999-12-31", "sa", datetime(9999, 12, 31, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)),
    ],
)  # fmt: skip
def test_a_date_is_the_range_its_precision_covers(
    sent: str, prefix: str, start: datetime, end: datetime
) -> None:
    bound = read_date("_lastUpdated", sent)
    assert (bound.prefix, bound.start, bound.end) == (prefix, start, end)


@pytest.mark.parametrize(
    "sent", ["xx2026", "2026-13", "2026-02-30", "ge0001-01-01T00:00+01:00", "MRN-0042", "", "2026-11-07T10"]
)
def test_a_date_that_is_not_one_is_refused_naming_the_parameter(sent: str) -> None:
    with pytest.raises(SearchRefused) as refused:
        read_date("_lastUpdated", sent)
    assert refused.value.parameter == "_lastUpdated" and (not sent or sent not in refused.value.message)


def test_tokens_and_references() -> None:
    assert read_token("identifier", "ORD-1") == Token("ORD-1", None)  # any system
    assert read_token("identifier", "|ORD-1") == Token("ORD-1", "")  # none
    assert read_token("identifier", "urn:x|ORD-1") == Token("ORD-1", "urn:x")
    focus = TASK_PARAMS["focus"]
    for sent in ("abc-1", "ServiceRequest/abc-1", "https://h.example/fhir/ServiceRequest/abc-1/_history/1"):
        assert read_reference(focus, sent) == "abc-1"
    assert read_reference(focus, "Patient/abc-1") is None  # another type: nothing matches
    with pytest.raises(SearchRefused):
        read_reference(focus, "ServiceRequest/a b")


def test_or_within_a_value_and_and_across_repeats() -> None:
    search = read_search([("status", "received,on-hold"), ("status", "received")], TASK_PARAMS, None)
    assert search.values("status") == [[Token("received"), Token("on-hold")], [Token("received")]]
    with pytest.raises(SearchRefused) as refused:
        read_search([("status", "received,")], TASK_PARAMS, None)
    assert refused.value.parameter == "status"
    assert read_search([("_count", "1000")], TASK_PARAMS, None).count == 100  # the largest page served
    lenient = read_search([("name", "Jane"), ("_sort", "x")], TASK_PARAMS, "handling=lenient")
    assert lenient.applied == []
    with pytest.raises(SearchRefused) as strict:
        read_search([("name", "Jane"), ("_sort", "x")], TASK_PARAMS, "return=minimal, handling=strict")
    assert strict.value.parameter == "_sort, name" and "Jane" not in strict.value.message
