"""Replay cases' histories on this install's workflow code, as a worker restart (or a query of a closed case) does.

Before a new worker version goes out, `secondopinion case replay-check` runs this against the running cases: a case
that does not replay here would fail its workflow task on every attempt once the new worker picks it up (README,
"Changing the workflow"). The test suite runs it over every case its tests ran (`tests/conftest.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from temporalio.client import Client, WorkflowExecution
from temporalio.worker import Replayer, WorkflowRunner

from workflows.case import CaseWorkflow

ERROR_CHARS = 300  # of the SDK's reason (event ids and command types: no PHI), per case


@dataclass
class ReplayCheck:
    replayed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # case_id, run_id, error


async def replay_cases(
    client: Client,
    runner: WorkflowRunner,
    query: str,
    limit: int | None = None,
    keep: Callable[[WorkflowExecution], bool] = lambda _: True,
) -> ReplayCheck:
    """Replay each case the visibility `query` finds that `keep` keeps, with `client`'s data converter (the
    worker's CODEC_KEY decrypts the histories) and `runner` (the worker's)."""
    replayer = Replayer(
        workflows=[CaseWorkflow], data_converter=client.data_converter, workflow_runner=runner
    )
    check = ReplayCheck()
    async for execution in client.list_workflows(query, limit=limit):
        if not keep(execution):
            continue
        history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        check.replayed += 1
        if result.replay_failure is not None:
            check.failed.append(
                {
                    "case_id": execution.id.removeprefix("case-"),
                    "run_id": execution.run_id or "",
                    "error": str(result.replay_failure)[:ERROR_CHARS],
                }
            )
    return check
