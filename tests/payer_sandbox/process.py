"""The payer sandbox as a process for tests, and the sandbox payer (SBX01) pointed at it for a while."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.common.config import PROJECT_ROOT
from services.insurance.models import InsurancePayer
from tests.infra import free_port


@contextmanager
def running_sandbox(env: dict[str, str] | None = None) -> Iterator[int]:
    """Start `python -m tests.payer_sandbox` on a free loopback port (`env`: PAYER_SANDBOX_* settings) and
    yield the port once it accepts connections."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.payer_sandbox", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the payer sandbox did not start") from exc
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def sandbox_payer(engine: Engine, url: str, envelope: str = "mime") -> Iterator[None]:
    """Point payer SBX01 at `url` in the CORE `envelope` form; put it back as it was afterwards (the other
    modules' tests find their sandbox again)."""
    with Session(engine) as session:
        payer = session.get(InsurancePayer, "SBX01")
        assert payer is not None
        before = (payer.endpoint_url, payer.timeout_seconds, payer.core_envelope)
        payer.endpoint_url, payer.timeout_seconds, payer.core_envelope = url, 2.0, envelope
        session.add(payer)
        session.commit()
    try:
        yield
    finally:
        with Session(engine) as session:
            payer = session.get(InsurancePayer, "SBX01")
            assert payer is not None
            payer.endpoint_url, payer.timeout_seconds, payer.core_envelope = before
            session.add(payer)
            session.commit()
