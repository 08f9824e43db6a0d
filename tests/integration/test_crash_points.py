"""Each dangerous window is safe: the process is killed inside it (CRASH_POINTS), restarted, and the test
checks that nothing was lost and nothing was applied twice. Real processes, broker, database and Temporal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio.client import Client

from contracts import Coverage, VerifyInsurance, new_event
from contracts.events import InsuranceVerified, ReviewOffered
from contracts.models import CaseStatus, CoverageStatus
from services.common import migrate
from services.common.amqp import COMMANDS, EVENTS, Publisher, ensure_topology
from services.common.config import Settings
from services.common.crashpoints import KILLED
from services.common.db import make_engine
from tests.e2e.test_case_end_to_end import free_ports
from tests.infra import purge_queues, queue_depth
from tests.integration.test_case_workflow import Services, case_input, wait_status
from workflows.case import CaseWorkflow


@pytest.fixture(scope="module")
def insurance_engine(settings: Settings) -> Engine:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    ensure_topology(settings)
    return engine


class Process:
    """One service or worker process, restartable with the same environment."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.child = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def wait_killed(self, timeout: float = 60) -> int:
        assert self.child is not None
        return self.child.wait(timeout=timeout)

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=10)
            if self.child.poll() is None:
                self.child.kill()


def process_env(settings: Settings, tmp: Path, crash: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url or "",
        "AMQP_URL": settings.amqp_url,
        "DATA_DIR": str(tmp),
        "CRASH_POINTS": crash,
        "CRASH_POINTS_DIR": str(tmp),
        "AMQP_DELIVERY_LIMIT": str(settings.amqp_delivery_limit),
        **extra,
    }


@contextlib.contextmanager
def insurance_process(settings: Settings, tmp: Path, crash: str) -> Iterator[Process]:
    port = free_ports(("insurance",))["insurance"]
    process = Process(
        [sys.executable, "-m", "services.insurance.main"],
        process_env(settings, tmp, crash, INSURANCE_PORT=str(port)),
        tmp / "insurance.log",
    )
    process.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        time.sleep(0.2)
    try:
        yield process
    finally:
        process.stop()


class Watch:
    """A private queue that records what is published."""

    def __init__(self, settings: Settings, bindings: list[tuple[str, str]]) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        self.channel = self.conn.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        for exchange, key in bindings:
            self.channel.queue_bind(self.queue, exchange, routing_key=key)

    def drain(
        self,
        seconds: float,
        subject: str | None = None,
        *,
        done: str | None = None,
        times: int = 1,
        quiet: float = 3.0,
    ) -> list[tuple[str, dict[str, Any]]]:
        """What was published within `seconds`; with `subject`, only that case's messages (the service
        also publishes rows other tests left in its outbox, in the database they share). With `done` (a
        message type), it stops `quiet` seconds after the `times`-th message of that type: time enough for a
        duplicate, if any, to show (a loaded machine may take long to restart a service, so a fixed window
        is not)."""
        seen = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                time.sleep(0.1)
                continue
            message = json.loads(body)
            if subject is None or message.get("subject") == subject:
                seen.append((props.message_id, message))
                if done is not None and [m.get("type") for _, m in seen].count(done) == times:
                    deadline = min(deadline, time.monotonic() + quiet)
        return seen

    def close(self) -> None:
        self.conn.close()


def verify_command(case_id: str) -> Any:
    return new_event(
        id=f"cmd-{uuid.uuid4()}",
        source="/test",
        subject=case_id,
        data=VerifyInsurance(
            case_id=case_id, coverage=Coverage(plan_code="ACME-PPO", member_id="W9"), patient_state="CA"
        ),
    )


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def test_killed_after_commit_before_ack_applies_once_and_loses_nothing(
    settings: Settings, insurance_engine: Engine, tmp_path: Path
) -> None:
    purge_queues(settings.amqp_url, "insurance")
    watch = Watch(settings, [(EVENTS, "insurance.verified")])
    case_id = str(uuid.uuid4())
    command = verify_command(case_id)
    with insurance_process(settings, tmp_path, "consumer.after_commit_before_ack") as service:
        Publisher(settings).publish(COMMANDS, command)
        assert service.wait_killed() == KILLED
        # The window is real: the effect and the inbox row are committed, the message is still unacked.
        assert (
            count(insurance_engine, "select count(*) from coverage_verifications where case_id=:c", c=case_id)
            == 1
        )
        assert count(insurance_engine, "select count(*) from inbox where message_id=:m", m=command.id) == 1
        service.start()  # restarted: the broker redelivers the message, the inbox drops it
        published = watch.drain(60, subject=case_id, done="insurance.verified", quiet=5)
    watch.close()
    assert [m for m, _ in published] == [f"{command.id}>insurance.verified"]
    assert (
        count(insurance_engine, "select count(*) from coverage_verifications where case_id=:c", c=case_id)
        == 1
    )
    assert queue_depth(settings.amqp_url, "insurance") == 0
    assert queue_depth(settings.amqp_url, "insurance.dlq") == 0


@pytest.mark.parametrize("point", ["outbox.after_publish_before_mark", "publish.after_send_before_confirmed"])
def test_killed_after_publishing_republishes_the_same_id_and_nothing_else(
    settings: Settings, insurance_engine: Engine, tmp_path: Path, point: str
) -> None:
    purge_queues(settings.amqp_url, "insurance")
    watch = Watch(settings, [(EVENTS, "insurance.verified")])
    case_id = str(uuid.uuid4())
    command = verify_command(case_id)
    with insurance_process(settings, tmp_path, point) as service:
        Publisher(settings).publish(COMMANDS, command)
        assert service.wait_killed() == KILLED
        service.start()
        published = watch.drain(60, subject=case_id, done="insurance.verified", times=2, quiet=5)
    watch.close()
    # At least once, never lost: the same message id again, which every consumer's inbox (and the
    # workflow's seen-id set) drops. The outbox row ends marked.
    ids = [m for m, _ in published]
    assert ids == [f"{command.id}>insurance.verified"] * 2
    assert published[0][1] == published[1][1]
    assert InsuranceVerified.model_validate(published[0][1]["data"]).coverage_status == CoverageStatus.COVERED
    marked = "select count(*) from outbox where message_id=:m and published_at is not null"
    assert count(insurance_engine, marked, m=ids[0]) == 1


def worker_process(settings: Settings, temporal_env, tmp: Path, crash: str, queue: str) -> Process:  # type: ignore[no-untyped-def]
    address = temporal_env.client.service_client.config.target_host
    env = process_env(settings, tmp, crash, TEMPORAL_ADDRESS=address, TEMPORAL_TASK_QUEUE=queue)
    return Process([sys.executable, "-m", "workflows.worker"], env, tmp / "worker.log")


async def test_worker_killed_after_publishing_a_command_retries_it_under_the_same_id(
    settings: Settings, temporal_env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    purge_queues(settings.amqp_url, "workflows.bridge")
    watch = Watch(settings, [(EVENTS, "case.status_changed"), (COMMANDS, "records.collect")])
    queue = f"crash-{uuid.uuid4().hex[:6]}"
    worker = worker_process(settings, temporal_env, tmp_path, "activity.after_publish_before_complete", queue)
    worker.start()
    client: Client = temporal_env.client
    case_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=queue
    )
    try:
        assert await asyncio.to_thread(worker.wait_killed) == KILLED
        worker.start()  # Temporal retries the activity once its start-to-close timeout (30 s) has passed
        published = await asyncio.to_thread(lambda: watch.drain(45, case_id, done="records.collect"))
    finally:
        worker.stop()
        await handle.terminate("test done")
        watch.close()
    mine = [(m, body["type"]) for m, body in published if body["subject"] == case_id]
    status_ids = [m for m, kind in mine if kind == "case.status_changed"]
    assert len(status_ids) == 2 and status_ids[0] == status_ids[1]  # the same id: consumers drop the second
    assert [kind for _, kind in mine].count("records.collect") == 1  # the case went on exactly once


async def test_bridge_killed_after_signalling_is_harmless(
    settings: Settings, temporal_env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    purge_queues(settings.amqp_url, "workflows.bridge")
    queue = f"crash-{uuid.uuid4().hex[:6]}"
    worker = worker_process(settings, temporal_env, tmp_path, "bridge.after_signal_before_ack", queue)
    worker.start()
    client: Client = temporal_env.client
    case_id = str(uuid.uuid4())
    handle = await client.start_workflow(
        CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=queue
    )
    event = new_event(
        id=f"evt-{uuid.uuid4()}",
        source="/test",
        subject=case_id,
        data=InsuranceVerified(
            case_id=case_id, coverage_status=CoverageStatus.COVERED, plan_code="ACME-PPO", cpt="76140",
            allowed_amount=Decimal("300"), patient_cost=Decimal("0"), explanation="covered",
        ),
    )  # fmt: skip
    try:
        for _ in range(100):
            if await handle.query(CaseWorkflow.status) == CaseStatus.AWAITING_RECORDS:
                break
            await asyncio.sleep(0.1)
        Publisher(settings).publish(EVENTS, event)
        assert await asyncio.to_thread(worker.wait_killed) == KILLED
        worker.start()  # the unacked event is redelivered and signalled again
        for _ in range(200):
            signals = [
                e
                for e in (await handle.fetch_history()).events
                if e.HasField("workflow_execution_signaled_event_attributes")
            ]
            if len(signals) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(signals) == 2  # delivered twice ...
        await asyncio.sleep(0.5)
        # ... applied once: the second carries the same event id and is dropped by the workflow.
        assert queue_depth(settings.amqp_url, "workflows.bridge") == 0
        assert await handle.query(CaseWorkflow.received) == [f"insurance.verified {event.id}"]
    finally:
        worker.stop()
        await handle.terminate("test done")


async def test_an_answer_recorded_before_the_step_that_asked_is_replayed_is_still_taken(
    settings: Settings, temporal_env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The worker dies after publishing `review.match` and before Temporal recorded that step; the review
    service answers at once, so the offer is in the history before the restarted worker replays the step
    that asked for it. The case must take that offer (it used to wait at `matching` for ever)."""
    ensure_topology(settings)
    purge_queues(settings.amqp_url, "workflows.bridge")
    queue = f"crash-{uuid.uuid4().hex[:6]}"
    crash = "activity.after_publish_before_complete@review.match"
    worker = worker_process(settings, temporal_env, tmp_path, crash, queue)
    worker.start()
    client: Client = temporal_env.client
    case_id = str(uuid.uuid4())
    services = Services(settings, case_id)
    handle = await client.start_workflow(
        CaseWorkflow.run, case_input(case_id), id=f"case-{case_id}", task_queue=queue
    )
    try:
        await services.expect("records.collect")
        services.insurance_verified(patient_cost="0")
        services.records_assembled()
        match = await services.expect("review.match", timeout=30)
        assert await asyncio.to_thread(worker.wait_killed) == KILLED
        offered = ReviewOffered(
            case_id=case_id,
            review_id="r-early",
            reviewer_id="spec-early",
            subspecialty="gynecologic_imaging",
            explanation="licensed in CA",
        )
        # As the review service's answer would be, under the id derived from the command's.
        await handle.signal(
            CaseWorkflow.on_event,
            new_event(id=f"{match['id']}>{offered.TYPE}", source="/test", subject=case_id, data=offered),
        )
        worker.start()  # Temporal hands the unrecorded step to it once the task's timeout (10 s) passed
        await wait_status(handle, CaseStatus.AWAITING_ACCEPTANCE, timeout=60)
        assert (await handle.query(CaseWorkflow.review)).review_id == "r-early"
    finally:
        worker.stop()
        services.close()
        await handle.terminate("test done")
