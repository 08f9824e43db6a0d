"""The DICOM audit message schema (PS3.15 A.5.1, audit-message.rng beside this file) and a validator."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lxml import etree

SCHEMA = Path(__file__).with_name("audit-message.rng")


@lru_cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def valid_audit_message(xml: bytes) -> etree._Element:
    """The parsed message; AssertionError naming the schema's complaint when it is not a DICOM audit message."""
    document = etree.fromstring(xml)
    schema = _schema()
    assert schema.validate(document), f"not a DICOM audit message: {schema.error_log.last_error}"
    return document
