"""The chaos run: a private broker, Temporal and database, the whole application, a batch of cases driven
through the real APIs, and `kill -9` of a random process at random moments until the faults are spent.

    setup -> inject poison -> [drive cases  ||  kill -9 / restart, repeatedly] -> verdict -> teardown

A process that dies on its own (its broker was down when it started) is restarted too, as a supervisor
would; those restarts are counted apart from the injected faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common.amqp import ensure_topology
from services.common.config import Settings
from services.common.temporal import connect_temporal
from tests.chaos.checks import Verdict, inject_poison, verdict
from tests.chaos.driver import ChaosCase, Driver, new_run_id
from tests.chaos.processes import Managed, application, rabbitmq_node, temporal_server
from tests.chaos.webhooks import Receiver
from tests.infra import free_ports, postgres_database

TARGETS = ("worker", "intake", "records", "insurance", "review", "rabbitmq", "temporal")


@dataclass
class Fault:
    at: float
    target: str
    down_for: float
    ready_after: float


@dataclass
class Run:
    cases: int
    faults: int
    minutes: float
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1 << 30))
    injected: list[Fault] = field(default_factory=list)
    supervisor_restarts: int = 0
    elapsed: float = 0.0
    started: float = 0.0  # monotonic time the driving began
    targets: tuple[str, ...] = TARGETS  # the processes faults may hit
    closed_after: float | None = None
    verdict: Verdict | None = None
    case_list: list[ChaosCase] = field(default_factory=list)


@contextlib.contextmanager
def system(work: Path, echo: Callable[[str], None]) -> Iterator[tuple[Settings, dict[str, Managed]]]:
    """Broker, Temporal, database and application, all private to this run; everything stopped after."""
    names = ("amqp", "dist", "temporal", "temporal_http", "temporal_metrics", "payer", "scp", "codec")
    ports = free_ports((*names, "intake", "records", "insurance", "review"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "CRASH_POINTS"))}
    processes: dict[str, Managed] = {}
    with postgres_database() as database_url:
        env = {
            **base,
            "DATA_DIR": str(work / "data"),
            "DATABASE_URL": database_url,
            "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{ports['amqp']}/%2F",
            # A kill -9 returns unacked messages, which counts as a delivery: leave room for many crashes
            # so only messages that can never succeed (poison) are dead-lettered.
            "AMQP_DELIVERY_LIMIT": "50",
            "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
            "PAYER_SANDBOX_PORT": str(ports["payer"]),
            "RECORDS_SCP_PORT": str(ports["scp"]),
            "CODEC_SERVER_PORT": str(ports["codec"]),
            "LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
        }
        for name in ("intake", "records", "insurance", "review"):
            env[f"{name.upper()}_PORT"] = str(ports[name])
            env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{ports[name]}"
        settings = Settings(
            **{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields}  # type: ignore[arg-type]
        )
        try:
            for process in (rabbitmq_node(work, ports, base), temporal_server(work, ports, base)):
                processes[process.name] = process
                process.start()
                process.wait_ready()
            echo(f"chaos broker on {ports['amqp']}, Temporal on {ports['temporal']}, database ready")
            ensure_topology(settings)
            for process in application(work, env):
                processes[process.name] = process
                process.start()
            for process in processes.values():
                process.wait_ready()
            echo("services and worker ready")
            yield settings, processes
        finally:
            for process in reversed(list(processes.values())):
                process.retire()


def create_partner(settings: Settings) -> tuple[dict[str, str], str]:
    """A partner through the operators' CLI, and an operations key for the specialist's side."""
    env = {**os.environ, "DATABASE_URL": settings.database_url or "", "DATA_DIR": str(settings.data_dir)}
    command = [sys.executable, "-m", "services.common.cli"]
    partner = subprocess.run(
        [*command, "partner", "create", "--name", "Chaos clinic", "--partner-id", "chaos-clinic"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    staff = subprocess.run(
        [*command, "key", "create", "--role", "operations", "--label", "chaos-ops"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(partner.stdout), json.loads(staff.stdout)["api_key"]


def specialist_key(settings: Settings, reviewer: str) -> str:
    """The key `reviewer` signs findings with, issued through the operators' CLI on this run's database."""
    env = {**os.environ, "DATABASE_URL": settings.database_url or "", "DATA_DIR": str(settings.data_dir)}
    created = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "key", "create", "--role", "specialist",
         "--specialist-id", reviewer, "--label", "chaos-specialist"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return str(json.loads(created.stdout)["api_key"])


def register_webhook(settings: Settings, partner: dict[str, str], url: str) -> None:
    """The partner's outbound webhook endpoint, so delivered webhook ids can be counted."""
    response = httpx.post(
        f"{settings.intake_url}/v1/partners/{partner['partner_id']}/webhook-endpoints",
        json={"url": url, "description": "chaos receiver"},
        headers={"Authorization": f"Bearer {partner['api_key']}"},
        timeout=20,
    )
    response.raise_for_status()


class Injector(threading.Thread):
    """Kills a random process at random moments, restarts it, and keeps every process alive."""

    def __init__(self, run: Run, processes: dict[str, Managed], window: float, started: float) -> None:
        super().__init__(daemon=True)
        self.run_, self.processes, self.window, self.started = run, processes, window, started
        self.random = random.Random(run.seed)
        self.stopping = threading.Event()
        self.faults_done = threading.Event()

    def plan(self) -> list[str]:
        """Every target at least once (when the faults allow), the rest at random."""
        targets = list(self.run_.targets)
        self.random.shuffle(targets)
        extra = [
            self.random.choice(self.run_.targets) for _ in range(max(0, self.run_.faults - len(targets)))
        ]
        return (targets + extra)[: self.run_.faults]

    def run(self) -> None:
        plan = self.plan()
        for done, target in enumerate(plan):
            # Spread what is left of the window over the faults left, net of how long a fault has taken.
            spent = time.monotonic() - self.started
            cost = sum(f.down_for + f.ready_after for f in self.run_.injected) / max(1, done)
            gap = max(0.5, (self.window - spent) / (len(plan) - done) - cost)
            if self.stopping.wait(self.random.uniform(0.3 * gap, 1.7 * gap)):
                return
            self.fault(target)
        self.faults_done.set()
        while not self.stopping.wait(1):
            self.supervise()

    def fault(self, target: str) -> None:
        process = self.processes[target]
        at = time.monotonic() - self.started
        process.kill()
        down_for = self.random.uniform(0.2, 3.0)
        time.sleep(down_for)
        began = time.monotonic()
        process.start()
        with contextlib.suppress(RuntimeError):
            process.wait_ready()
        self.run_.injected.append(Fault(at, target, down_for, time.monotonic() - began))
        self.supervise()

    def supervise(self) -> None:
        for process in self.processes.values():
            if not process.alive():
                process.start()
                self.run_.supervisor_restarts += 1


async def drive(run: Run, driver: Driver, started: float, deadline: float, injector: Injector) -> None:
    pending = list(run.case_list)
    while time.monotonic() < deadline:
        pending = [case for case in pending if not case.done]
        if not pending and run.closed_after is None:
            run.closed_after = time.monotonic() - started
        if not pending and injector.faults_done.is_set():
            return
        if not pending:  # all closed: wait for the remaining faults (and the restarts) to finish
            await asyncio.sleep(1)
            continue
        now = time.monotonic()
        released = [case for case in pending if case.release_at <= now][:25]
        await asyncio.gather(*(driver.step(case) for case in released))
        pending = [case for case in pending if case not in released] + released
        await asyncio.sleep(0.5)


async def execute(
    run: Run, settings: Settings, processes: dict[str, Managed], echo: Callable[[str], None]
) -> None:
    partner, operations_key = create_partner(settings)
    receiver = Receiver()
    register_webhook(settings, partner, receiver.url)
    run_id = new_run_id()
    expected_dlq = inject_poison(settings, run_id)
    run.case_list = [ChaosCase(number=i, run_id=run_id) for i in range(run.cases)]
    driver = Driver(settings, partner, operations_key, lambda reviewer: specialist_key(settings, reviewer))
    started = run.started = time.monotonic()
    deadline = started + run.minutes * 60
    # Faults are spread over the time the batch is expected to take (about 8 s of stack time per case)
    # and the faults need (a kill, a few seconds down, a restart until ready: about 7 s each).
    window = min(run.minutes * 60 * 0.6, max(40.0, 8.0 * run.cases, 7.0 * run.faults))
    # Cases are released over the same window, so faults always land on cases in flight.
    for case in run.case_list:
        case.release_at = started + case.number * window * 0.85 / max(1, run.cases)
    injector = Injector(run, processes, window, started)
    injector.start()
    try:
        await drive(run, driver, started, deadline, injector)
    finally:
        injector.stopping.set()
        await asyncio.to_thread(injector.join, 180)
        await driver.close()
    run.elapsed = time.monotonic() - started
    echo(f"driving done after {run.elapsed:.0f}s; checking")
    for process in processes.values():  # everything up for the checks
        with contextlib.suppress(RuntimeError):
            process.wait_ready(60)
    await asyncio.sleep(3)  # let the last outbox rows and events settle
    client = await connect_temporal(settings)
    await asyncio.sleep(5)  # webhooks retried after a crash
    run.verdict = await verdict(settings, client, run.case_list, expected_dlq, receiver.received)
    receiver.close()


def check_targets(targets: tuple[str, ...]) -> None:
    """ValueError unless `targets` names one or more of the processes a fault can hit."""
    if not targets or not set(targets) <= set(TARGETS):
        raise ValueError(f"fault targets {list(targets)}: choose one or more of {', '.join(TARGETS)}")


def chaos(
    cases: int,
    faults: int,
    minutes: float,
    echo: Callable[[str], None] = print,
    seed: int | None = None,
    targets: tuple[str, ...] = TARGETS,
) -> Run:
    check_targets(targets)
    run = Run(cases=cases, faults=faults, minutes=minutes, targets=targets)
    if seed is not None:
        run.seed = seed  # the same faults on the same targets after the same gaps as the run that printed it
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        with system(work, echo) as (settings, processes):
            asyncio.run(execute(run, settings, processes, echo))
    finally:
        if os.environ.get("CHAOS_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            echo(f"kept {work}")
    return run
