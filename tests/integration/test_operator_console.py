"""`secondopinion case …` and `secondopinion specialist …`: operations find and steer cases, and keep the
specialist directory, from the console — on a real Temporal dev server running the real case workflow (the
case tests' worker and event bridge), and on the real review schema."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from temporalio import workflow
from temporalio.client import Client

from contracts import CaseStatus
from contracts.models import CaseInput
from services.common import cli, migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.temporal import ENCODING
from services.review.models import Review, Specialist
from tests.integration.test_case_workflow import client, start, to_match, to_review, wait_status  # noqa: F401
from workflows import replay_check
from workflows.case import CaseWorkflow
from workflows.models import CaseOutcome

CONSOLE = Path(sys.executable).parent / "secondopinion"


@pytest.fixture
def console_env(client: Client, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:  # noqa: F811
    """The console pointed at the tests' Temporal server (the rest of its settings are the session's)."""
    address = client.service_client.config.target_host
    monkeypatch.setenv("TEMPORAL_ADDRESS", address)
    get_settings.cache_clear()
    yield {**os.environ, "TEMPORAL_ADDRESS": address}
    get_settings.cache_clear()


async def console(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """One command as `secondopinion` runs it (in a thread: it runs its own event loop); its JSON output."""
    await asyncio.to_thread(cli.main, list(argv))
    # The worker and the bridge of this process log to stdout too: the command's output is its one JSON line.
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("{", "["))]
    return json.loads(printed[-1])


async def refused(*argv: str) -> str:
    """What the console says when it refuses the command (exit 1 with the reason)."""
    with pytest.raises(SystemExit) as refusal:
        await asyncio.to_thread(cli.main, list(argv))
    return str(refusal.value.code)


async def test_operations_find_a_case_by_status_and_hold_and_resume_it_from_the_console(
    client: Client,  # noqa: F811
    settings: Settings,
    console_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle, services = await start(client, settings)
    case_id = services.case_id
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)

    listed = await console(capsys, "case", "list", "--status", "awaiting_records", "--partner", "partner-a")
    mine = [row for row in listed if row["case_id"] == case_id]
    assert mine and mine[0]["status"] == "awaiting_records" and mine[0]["running"] is True
    assert mine[0]["urgency"] == "priority" and mine[0]["due_at"].endswith("Z")
    assert "Canary" not in json.dumps(listed)  # the search attributes only: no patient name
    others = await console(capsys, "case", "list", "--status", "in_review", "--partner", "partner-a")
    assert case_id not in [row["case_id"] for row in others]

    held = await console(
        capsys, "case", "hold", case_id, "--by", "nurse-12", "--reason", "patient travelling"
    )
    assert held == {
        "case_id": case_id,
        "decision": "hold",
        "result": "case on hold; the due date keeps running",
    }
    assert await handle.query(CaseWorkflow.status) == CaseStatus.ON_HOLD
    history = await handle.fetch_history()  # the decision's input is kept encrypted, as the services' are
    accepted = [e.workflow_execution_update_accepted_event_attributes for e in history.events]
    inputs = [a.accepted_request.input.args.payloads for a in accepted if a.accepted_request.meta.update_id]
    assert inputs and all(p.metadata["encoding"] == ENCODING for args in inputs for p in args)
    assert b"patient travelling" not in history.to_json().encode()
    again = await refused("case", "hold", case_id, "--by", "nurse-12", "--reason", "still travelling")
    assert again == f"case {case_id}: hold refused: the case is already on hold"

    shown = await console(capsys, "case", "show", case_id)
    assert shown["status"] == "on_hold" and shown["running"] is True
    assert "on_hold" in shown["waiting_for"]
    assert [(d["name"], d["by"], d["reason"]) for d in shown["decisions"]] == [
        ("hold", "nurse-12", "patient travelling")
    ]
    assert shown["timeline"][-1]["status"] == "on_hold"

    resumed = await console(capsys, "case", "resume", case_id, "--by", "nurse-12")
    assert resumed["result"] == "resumed in awaiting_records"
    await wait_status(handle, CaseStatus.AWAITING_RECORDS)


async def test_a_decision_the_case_cannot_take_is_refused_with_the_workflows_reason_and_nothing_recorded(
    client: Client,  # noqa: F811
    settings: Settings,
    console_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle, services = await start(client, settings)
    case_id = services.case_id
    await to_review(handle, services)

    said = await refused("case", "decide-cost", case_id, "--by", "nurse-12", "--choice", "accept")
    assert said == f"case {case_id}: decide_cost refused: no cost decision is pending (status in_review)"
    typo = await refused("case", "cancel", case_id, "--by", "nurse-12", "--reason", "no")
    assert typo.startswith("--reason: String should have at least 3 characters")
    when = await refused(
        "case", "document-communication", case_id, "--by", "nurse-12", "--recipient", "Dr. Alex Kim",
        "--recipient-role", "referring physician", "--method", "telephone", "--at", "yesterday",
    )  # fmt: skip
    assert when.startswith("--at: ")
    decisions = await handle.query(CaseWorkflow.decisions)
    assert [d.name for d in decisions] == ["decide_cost"]  # the patient's, from to_review; nothing since

    reassigned = await console(
        capsys, "case", "reassign", case_id, "--by", "nurse-12", "--reason", "conflict of interest"
    )
    assert reassigned["decision"] == "reassign_reviewer"
    await services.expect("review.withdraw")


async def test_an_ended_or_unknown_case_and_a_bad_filter_are_said_plainly(
    client: Client,  # noqa: F811
    settings: Settings,
    console_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle, services = await start(client, settings)
    case_id = services.case_id
    await to_match(services)
    await console(capsys, "case", "cancel", case_id, "--by", "nurse-12", "--reason", "patient withdrew")
    await handle.result()

    ended = await refused("case", "hold", case_id, "--by", "nurse-12", "--reason", "patient travelling")
    assert ended == f"case {case_id} has ended (closed or cancelled); nothing can be decided on it any more"
    shown = await console(capsys, "case", "show", f"case-{case_id}")  # the workflow id works too
    assert shown["status"] == "cancelled" and shown["running"] is False and shown["closed_at"]
    assert [d["name"] for d in shown["decisions"]] == ["cancel"]

    unknown = await refused("case", "show", "no-such-case")
    assert unknown.startswith("no case no-such-case on this Temporal namespace")
    assert (await refused("case", "list", "--status", "waiting")).startswith("no case status waiting;")
    injected = await refused("case", "list", "--partner", 'a" OR PartnerId != "b')
    assert "is not an id" in injected


@workflow.defn(name="CaseWorkflow", sandboxed=False)
class ChangedCaseWorkflow(CaseWorkflow):
    """A new version of the workflow with an unguarded change: a timer first, which no running case started."""

    @workflow.run
    async def run(self, case: CaseInput) -> CaseOutcome:
        await workflow.sleep(timedelta(seconds=1))
        return await super().run(case)


async def test_before_a_worker_upgrade_operations_replay_the_running_cases_on_the_new_code(
    client: Client,  # noqa: F811
    settings: Settings,
    console_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handle, services = await start(client, settings)
    await to_match(services)

    checked = await console(capsys, "case", "replay-check", "--limit", "20")
    assert checked["failed"] == [] and 1 <= checked["replayed"] <= 20

    monkeypatch.setattr(replay_check, "CaseWorkflow", ChangedCaseWorkflow)  # the code about to be deployed
    said = await refused("case", "replay-check", "--limit", "20")
    # Of the running cases checked, each whose first workflow task ran (others of the session wait for a worker
    # on no queue): the newest, ours, named first.
    failing = re.match(
        r"(\d+) of (\d+) case\(s\) do not replay on this workflow code: a worker running it", said
    )
    assert failing and 1 <= int(failing[1]) <= int(failing[2]) == checked["replayed"], said
    named = said.split(": ", 2)[2]
    assert (
        named.startswith(f"{services.case_id} (Workflow activation completion failed")
        and "[TMPRL1100]" in named
    )
    assert "Canary" not in said  # ids and the SDK's reason only


def test_the_console_command_exits_with_its_own_status_after_talking_to_temporal(
    client: Client,  # noqa: F811
    console_env: dict[str, str],
) -> None:
    """The installed `secondopinion` entry point: JSON and 0 on success, the reason and 1 on a refusal, never
    the interpreter's abort at exit that temporalio can cause (sdk-python #300)."""
    listing = subprocess.run(
        [str(CONSOLE), "case", "list", "--limit", "5"],
        env=console_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert isinstance(json.loads(listing.stdout), list)
    missing = subprocess.run(
        [str(CONSOLE), "case", "show", "no-such-case"],
        env=console_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("no case no-such-case on this Temporal namespace")


# ---- the specialist directory ------------------------------------------------------------------------

ENTRY = {
    "id": "spec-console-1",
    "display_name": "Dana Reyes",
    "credentials": "MD",
    "npi": "1234567893",
    "subspecialties": ["breast_imaging"],
    "licensed_states": ["CA", "NV"],
    "organization": "Coastal Imaging",
    "max_open_reviews": 4,
}


def held_review(specialist_id: str, status: str) -> Review:
    return Review(
        id=str(uuid.uuid4()),
        case_id=str(uuid.uuid4()),
        reviewer_id=specialist_id,
        subspecialty="breast_imaging",
        status=status,
        match_event_id=str(uuid.uuid4()),
        match_explanation="licensed in CA",
        request={},
        exam_type="breast",
        urgency="standard",
        due_at=datetime.now(UTC) + timedelta(days=3),
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    cli.main(list(argv))
    return json.loads(capsys.readouterr().out)


def test_operations_keep_the_specialist_directory_from_the_console(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = tmp_path / "spec.json"
    entry.write_text(json.dumps(ENTRY))
    added = run(capsys, "specialist", "add", "--file", str(entry))
    assert (
        added["id"] == "spec-console-1"
        and added["active"] is True
        and added["licensed_states"] == ["CA", "NV"]
    )
    assert added in run(capsys, "specialist", "list", "--active")

    changed = {k: v for k, v in ENTRY.items() if k != "id"} | {
        "max_open_reviews": 2,
        "out_of_office": [{"start": "2026-12-24", "end": "2027-01-02"}],
    }
    entry.write_text(json.dumps(changed))
    updated = run(capsys, "specialist", "update", "spec-console-1", "--file", str(entry))
    assert updated["max_open_reviews"] == 2 and updated["out_of_office"] == changed["out_of_office"]
    engine = get_engine("review")
    migrate.upgrade("review", engine)
    with Session(engine) as session:  # one case they are reading, one they declined
        for status in ("accepted", "declined"):
            session.add(held_review("spec-console-1", status))
        session.commit()
    deactivated = run(capsys, "specialist", "deactivate", "spec-console-1")
    assert deactivated["active"] is False
    assert [held["review"] for held in deactivated["still_holds"]] == [
        "accepted"
    ]  # for operations to reassign
    assert "spec-console-1" not in [s["id"] for s in run(capsys, "specialist", "list", "--active")]
    assert run(capsys, "specialist", "show", "spec-console-1")["active"] is False

    with Session(engine) as session:  # what matching and the API read
        stored = session.get(Specialist, "spec-console-1")
        assert stored is not None and stored.active is False and stored.max_open_reviews == 2


def test_a_bad_directory_entry_is_refused_naming_the_field_and_nothing_is_written(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = tmp_path / "spec.json"
    entry.write_text(json.dumps(ENTRY | {"id": "spec-console-2", "licensed_states": ["California"]}))
    with pytest.raises(SystemExit) as bad:
        cli.main(["specialist", "add", "--file", str(entry)])
    assert str(bad.value.code).startswith(f"--file {entry} is not a directory entry: licensed_states.0: ")
    with pytest.raises(SystemExit) as missing:
        cli.main(["specialist", "show", "spec-console-2"])
    assert str(missing.value.code).startswith("no specialist spec-console-2 in the directory")

    entry.write_text(json.dumps(ENTRY | {"id": "spec-console-3"}))
    run(capsys, "specialist", "add", "--file", str(entry))
    with pytest.raises(SystemExit) as twice:
        cli.main(["specialist", "add", "--file", str(entry)])
    assert str(twice.value.code) == (
        "specialist spec-console-3 already exists; `secondopinion specialist update spec-console-3` changes it"
    )
    with pytest.raises(SystemExit) as nowhere:
        cli.main(["specialist", "update", "spec-console-9", "--file", str(tmp_path / "absent.json")])
    assert "No such file or directory" in str(nowhere.value.code)
