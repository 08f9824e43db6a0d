"""`secondopinion payer list|set`: an operator switches a payer to CORE's SOAP form and its https endpoint
from the console, and is told plainly what is wrong with a bad request (nothing is changed then)."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session

from services.common import cli, migrate
from services.common.config import Settings
from services.common.db import get_engine
from services.insurance import cli_payers
from services.insurance.models import InsurancePayer


@pytest.fixture(scope="module")
def payer() -> str:
    engine = get_engine("insurance")
    migrate.upgrade("insurance", engine)
    with Session(engine) as session:
        session.merge(InsurancePayer(payer_id="CLI01", name="Console Health", connector="plan_rules"))
        session.commit()
    return "CLI01"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    cli.main(list(argv))
    return json.loads(capsys.readouterr().out)


def test_an_operator_moves_a_payer_to_core_soap_over_https(
    capsys: pytest.CaptureFixture[str], payer: str
) -> None:
    changed = run(
        capsys, "payer", "set", payer, "--connector", "x12", "--core-envelope", "soap",
        "--endpoint-url", "https://payer.example/core/soap", "--timeout", "15",
    )  # fmt: skip
    assert changed == {
        "payer_id": payer,
        "name": "Console Health",
        "connector": "x12",
        "endpoint_url": "https://payer.example/core/soap",
        "timeout_seconds": 15.0,
        "core_envelope": "soap",
    }
    listed = run(capsys, "payer", "list")
    assert changed in listed  # type: ignore[operator]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--core-envelope", "xml"], "invalid choice"),
        (["--endpoint-url", "ftp://payer.example/core"], "must be the payer's https URL"),
        (["--timeout", "0"], "--timeout must be more than 0"),
    ],
)
def test_a_bad_setting_is_refused_saying_why_and_nothing_changes(
    capsys: pytest.CaptureFixture[str], payer: str, argv: list[str], said: str
) -> None:
    before = [p for p in run(capsys, "payer", "list") if p["payer_id"] == payer]  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as refused:
        cli.main(["payer", "set", payer, *argv])
    assert said in str(refused.value) or said in capsys.readouterr().err
    after = [p for p in run(capsys, "payer", "list") if p["payer_id"] == payer]  # type: ignore[attr-defined]
    assert after == before


def test_an_unknown_payer_or_plain_http_outside_development_is_refused(
    capsys: pytest.CaptureFixture[str], payer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit, match="no payer NOPE; `secondopinion payer list` shows them"):
        cli.main(["payer", "set", "NOPE", "--timeout", "5"])
    monkeypatch.setattr(cli_payers, "get_settings", lambda: Settings(env="prod"))
    with pytest.raises(SystemExit, match="must use https"):
        cli.main(["payer", "set", payer, "--endpoint-url", "http://payer.example/core"])
