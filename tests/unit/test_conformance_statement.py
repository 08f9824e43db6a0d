"""The DICOM Conformance Statement checked in is the one the code generates: a SOP class, transfer syntax,
status or setting changed without regenerating it fails here."""

import pytest

from scripts import conformance_statement
from scripts.conformance_statement import COMMAND, STATEMENT, render
from services.records import dimse


def test_the_checked_in_statement_is_what_the_code_generates() -> None:
    assert STATEMENT.read_text() == render(), (
        f"{STATEMENT.name} is not what the code says any more: run `{COMMAND}` and commit the result"
    )


def test_a_transfer_syntax_dropped_in_code_makes_the_checked_in_statement_stale(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dropped = dimse.COMPRESSED[-1]
    row = f"| {dropped.name} | `{dropped}` |"
    assert row in render()
    monkeypatch.setattr(dimse, "COMPRESSED", dimse.COMPRESSED[:-1])
    assert row not in render()
    assert conformance_statement.main(["--check"]) == 1
    assert COMMAND in capsys.readouterr().err
