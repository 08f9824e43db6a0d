"""The partner's order reference: which identifier systems are taken, and how `identifier=` is read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.intake.models import CaseCreate
from services.intake.order_reference import ReferenceSearch, SearchInvalid, is_identifier_system, parse_token
from tests.integration.test_intake_api import SAMPLE  # the partner's sample request


@pytest.mark.parametrize(
    "system",
    [
        "urn:oid:2.16.840.1.113883.19.5",
        "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
        "https://hospital.example/orders?facility=3#placer",
        "http://hl7.org/fhir/sid/us-npi",
        "urn:hospital-a:order",
        "https://hospital.example/a%20b",
    ],
)
def test_absolute_uris_are_identifier_systems(system: str) -> None:
    assert is_identifier_system(system)


@pytest.mark.parametrize(
    "system",
    ["", "MRN", "placer order", "urn:hospital a", "http://x/\x00", "http://x/\u00e9", "1urn:x", "urn:", "a:b%2"]
    + ["urn:" + "x" * 252],
    ids=["empty", "no scheme", "space", "space after scheme", "NUL", "non-ASCII", "digit first",
         "nothing after the scheme", "broken percent escape", "256 characters"],
)  # fmt: skip
def test_anything_else_is_not(system: str) -> None:
    assert not is_identifier_system(system)


@pytest.mark.parametrize(
    ("token", "search"),
    [
        ("ORD-1", ReferenceSearch("ORD-1", None, any_system=True)),
        ("|ORD-1", ReferenceSearch("ORD-1", None)),
        ("urn:hospital-a:order|ORD-1", ReferenceSearch("ORD-1", "urn:hospital-a:order")),
        ("urn:a|ORD\\|1", ReferenceSearch("ORD|1", "urn:a")),  # an escaped bar is part of the value
        ("urn:a|A\\,B\\\\", ReferenceSearch("A,B\\", "urn:a")),
        ("urn:a|x|y", ReferenceSearch("x|y", "urn:a")),  # split at the first bar: a URI carries none
    ],
)
def test_a_token_is_read_as_fhir_token_search_reads_it(token: str, search: ReferenceSearch) -> None:
    assert parse_token(token) == search


@pytest.mark.parametrize("token", ["", "|", "urn:a|", "not a uri|ORD-1", "ORD-1\\"])
def test_a_token_without_a_value_or_with_a_bad_system_is_refused_without_echo(token: str) -> None:
    with pytest.raises(SearchInvalid) as refused:
        parse_token(token)
    assert "ORD-1" not in str(refused.value) and "not a uri" not in str(refused.value)


@pytest.mark.parametrize("token", ["ORD-1,ORD-2", "urn:a|ORD-1,urn:a|ORD-2", "urn:a|ORD-1,"])
def test_an_or_of_several_identifiers_is_refused_as_no_one_order(token: str) -> None:
    # FHIR reads an unescaped comma as OR; a conditional create is for one order, so it says so.
    with pytest.raises(SearchInvalid, match="cannot name the one order") as refused:
        parse_token(token)
    assert "ORD-1" not in str(refused.value)


def test_the_json_api_takes_a_system_only_as_a_uri_and_with_its_reference() -> None:
    taken = CaseCreate.model_validate(
        SAMPLE | {"partner_case_ref": "777", "partner_case_ref_system": "urn:oid:1.2.3"}
    )
    assert (taken.partner_case_ref, taken.partner_case_ref_system) == ("777", "urn:oid:1.2.3")
    assert CaseCreate.model_validate(SAMPLE | {"partner_case_ref": "777"}).partner_case_ref_system is None
    for wrong in ({"partner_case_ref": "777", "partner_case_ref_system": "placer order"},
                  {"partner_case_ref_system": "urn:oid:1.2.3"}):  # fmt: skip
        with pytest.raises(ValidationError) as refused:
            CaseCreate.model_validate(SAMPLE | wrong)
        [error] = refused.value.errors()
        assert error["loc"] == ("partner_case_ref_system",) and "placer order" not in error["msg"]
