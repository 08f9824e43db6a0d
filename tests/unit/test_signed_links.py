"""Signing and checking a link (services.auth.signed_links) by itself: what is signed, rotation, production."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, urlencode

import pytest

from services.auth.signed_links import (
    LinkDoesNotMatch,
    LinkUnusable,
    SignedLinkSettings,
    sign,
    verify,
)

PATH = "/dicomweb/cases/c1/studies/1.2/series/1.2.3/instances/1.2.3.4/rendered"
SETTINGS = SignedLinkSettings(secret="s" * 40)


def test_a_link_verifies_however_its_query_is_encoded_and_ordered() -> None:
    query = sign(
        PATH, {"accept": "image/png", "viewport": "256,256"}, "key1", int(time.time()) + 60, SETTINGS
    )
    reordered = urlencode(list(reversed(parse_qsl(query))))  # + for spaces, %2C, another order: same query
    assert verify("GET", PATH, reordered, SETTINGS).kid == "key1"


def test_what_is_signed_cannot_be_changed() -> None:
    query = sign(PATH, {"accept": "image/png"}, "key1", int(time.time()) + 60, SETTINGS)
    for changed in (
        query.replace("image%2Fpng", "image%2Fgif"),
        query + "&window=1,2",
        query.replace("key1", "key2"),
    ):
        with pytest.raises(LinkDoesNotMatch, match="signature does not match"):
            verify("GET", PATH, changed, SETTINGS)
    with pytest.raises(LinkDoesNotMatch, match="another path"):
        verify("GET", PATH.replace("1.2.3.4", "1.2.3.5"), query, SETTINGS)
    with pytest.raises(LinkUnusable, match="reads"):
        verify("POST", PATH, query, SETTINGS)


def test_the_previous_secret_verifies_until_it_is_dropped() -> None:
    query = sign(PATH, {}, "key1", int(time.time()) + 60, SETTINGS)
    rotated = SignedLinkSettings(secret="t" * 40, previous_secret=SETTINGS.secret)
    assert verify("GET", PATH, query, rotated).kid == "key1"
    with pytest.raises(LinkDoesNotMatch):
        verify("GET", PATH, query, SignedLinkSettings(secret="t" * 40))


def test_an_expired_link_says_so_and_names_its_key() -> None:
    query = sign(PATH, {}, "key1", int(time.time()) - 1, SETTINGS)
    with pytest.raises(LinkUnusable, match="expired") as refused:
        verify("GET", PATH, query, SETTINGS)
    assert refused.value.kid == "key1"


def test_production_needs_a_real_secret() -> None:
    assert SignedLinkSettings().production_problems()  # the development default
    assert SignedLinkSettings(secret="short").production_problems()
    assert SETTINGS.production_problems() == []
