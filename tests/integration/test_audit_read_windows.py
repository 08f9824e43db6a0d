"""Read windows shared by replicas, on the real PostgreSQL: concurrent first reads of the same instances by one
key, served by two replicas in every order, write one entry per instance, and the chain holds."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy.engine import Engine

from services.auth import audit
from services.auth.audit_chain import entry_hash
from services.auth.read_windows import ReadWindows
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine


@pytest.fixture(scope="module")
def auth(settings: Settings) -> Engine:
    engine = make_engine("auth", settings)
    migrate.upgrade("auth", engine)
    return engine


def test_concurrent_reads_through_two_replicas_are_one_entry_per_instance(auth: Engine) -> None:
    replicas = [ReadWindows(600), ReadWindows(600)]
    case_id = str(uuid.uuid4())
    instances = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(6)]

    def viewer(seed: int) -> None:
        order = random.Random(seed).sample(instances, len(instances))
        for instance in order * 2:
            entry = audit.EntryFields(
                actor="key:0123456789ab", partner_id=None, role="operations", service="records",
                action="read", resource="records.dicomweb", case_id=case_id, outcome="success",
                detail=f"study 1.2.3 instance {instance}",
            )  # fmt: skip
            replicas[seed % 2].enter(auth, ("0123456789ab", case_id, instance), entry)

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(viewer, range(12)))
    logged = audit.entries(auth, case_id=case_id, limit=1000)
    assert sorted(e.detail.rsplit(" ", 1)[1] for e in logged) == sorted(instances)
    assert all(e.row_hash == entry_hash(e) for e in logged)
