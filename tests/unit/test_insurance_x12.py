"""Building and reading 005010X279A1 documents; pyx12 and the guide's rules refuse what is wrong."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.insurance.x12 import (
    Inquiry,
    Party,
    X12Invalid,
    build_270,
    envelope,
    parse_271,
    segment,
    validate,
)

INQUIRY = Inquiry(
    payer=Party("SANDBOX HEALTH", "SBX01"),
    provider=Party("SECONDOPINION READING GROUP", "1234567893"),
    member_id="SBX-MET",
    trace="c-42",
    control_number=17,
)


def a_271(*subscriber: str, payer_aaa: str = "") -> str:
    head = [
        segment("BHT", "0022", "11", "c-42", "20261128"),
        segment("HL", "1", "", "20", "1"),
        segment("NM1", "PR", "2", "SANDBOX HEALTH", "", "", "", "", "PI", "SBX01"),
    ]
    if payer_aaa:
        return envelope(
            [*head, segment("AAA", "N", "", payer_aaa, "R")],
            functional_id="HB",
            sender="SBX01",
            receiver="US",
            control=5,
        )
    body = [
        *head,
        segment("HL", "2", "1", "21", "1"),
        segment("NM1", "1P", "2", "READING GROUP", "", "", "", "", "XX", "1234567893"),
        segment("HL", "3", "2", "22", "0"),
        segment("TRN", "2", "c-42", "9SECONDOPN"),
        segment("NM1", "IL", "1", "", "", "", "", "", "MI", "SBX-MET"),
        *subscriber,
    ]
    return envelope(body, functional_id="HB", sender="SBX01", receiver="US", control=5)


def test_270_carries_the_member_payer_provider_and_service_types() -> None:
    document = build_270(INQUIRY)
    segments = {s.get_seg_id(): s for s in validate(document, "270")}
    assert segments["ST"].get_value("ST03") == "005010X279A1"
    assert segments["GS"].get_value("GS08") == "005010X279A1"
    assert segments["EQ"].get_value("EQ01") == "4^98"
    assert segments["TRN"].get_value("TRN02") == "c-42"
    assert segments["SE"].get_value("SE01") == str(
        len(document.split("~")) - 1 - 4
    )  # ST..SE, not ISA/GS/GE/IEA
    assert "NM1*IL*1******MI*SBX-MET~" in document
    assert "NM1*PR*2*SANDBOX HEALTH*****PI*SBX01~" in document


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda d: d.replace("SE*12*", "SE*11*"), "SE count"),
        (lambda d: d.replace("IEA*1*000000017", "IEA*1*000000018"), "does not match ISA"),
        (lambda d: d.replace("ST*270*0001*005010X279A1", "ST*270*0001*004010X092A1"), "ST must be a 270"),
        (lambda d: d.replace("EQ*4^98~", "DTP*291*D8*20261128~"), "EQ"),
        (lambda d: d.replace("HL*3*2*22*0~", "HL*3*2*23*0~"), "HL loops"),
        (lambda d: "GS*HS~" + d, "not an X12 interchange"),
    ],
)
def test_invalid_270s_are_refused(damage, says: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(X12Invalid, match=says):
        validate(damage(build_270(INQUIRY)), "270")


def test_a_270_is_not_a_271() -> None:
    with pytest.raises(X12Invalid, match="functional group HB"):
        parse_271(build_270(INQUIRY))


def test_271_benefits_are_read() -> None:
    document = a_271(
        segment("EB", "1", "IND", "4^98", "PR", "Gold PPO", "", "", "", "", "", "Y"),
        segment("EB", "B", "IND", "98", "PR", "", "27", "20.00", "", "", "", "", "Y"),
        segment("EB", "A", "IND", "98", "PR", "", "27", "", "0.2", "", "", "", "N"),
        segment("EB", "C", "IND", "4", "PR", "", "29", "80.00", "", "", "", "", "Y"),
    )
    answer = parse_271(document)
    assert (answer.trace, answer.member_id, answer.payer_id, answer.rejections) == (
        "c-42",
        "SBX-MET",
        "SBX01",
        (),
    )
    active, copay, coinsurance, remaining = answer.benefits
    assert (active.code, active.service_types, active.authorization_required, active.plan_name) == (
        "1",
        ("4", "98"),
        True,
        "Gold PPO",
    )
    assert (copay.amount, copay.in_network) == (Decimal("20.00"), "Y")
    assert (coinsurance.percent, coinsurance.in_network) == (Decimal("0.2"), "N")
    assert (remaining.time_period, remaining.amount) == ("29", Decimal("80.00"))


def test_271_rejections_are_read_with_their_loop() -> None:
    assert [
        (r.loop, r.reason, r.follow_up)
        for r in parse_271(a_271(segment("AAA", "Y", "", "72", "C"))).rejections
    ] == [("subscriber", "72", "C")]
    assert [(r.loop, r.reason) for r in parse_271(a_271(payer_aaa="42")).rejections] == [("payer", "42")]


@pytest.mark.parametrize(
    ("subscriber", "says"),
    [
        (segment("EB", "", "IND", "4"), "EB01"),
        (segment("AAA", "Y"), "AAA01 and AAA03"),
        (segment("EB", "B", "IND", "98", "PR", "", "27", "lots"), "not a number"),
    ],
)
def test_malformed_271s_are_refused(subscriber: str, says: str) -> None:
    with pytest.raises(X12Invalid, match=says):
        parse_271(a_271(subscriber))
