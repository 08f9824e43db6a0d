from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from scripts import stack
from services.common.config import Settings


def test_a_stopped_child_no_longer_counts_as_running(tmp_path: Path) -> None:
    # The process that ran `up` (a test's fixture, a benchmark) is the parent of what it started: an
    # exited child stays a zombie until reaped, and a zombie still answers kill(pid, 0), so `down`, which
    # waits for running_pid to say None, waited out its whole grace period for each one.
    settings = Settings(data_dir=tmp_path)
    process = stack.Process("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    pid = stack.start(process, settings)
    assert stack.running_pid(settings, "sleeper") == pid

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while stack.running_pid(settings, "sleeper") is not None and time.monotonic() < deadline:
        time.sleep(0.05)

    assert stack.running_pid(settings, "sleeper") is None, "a stopped child still counted as running"
    assert not (tmp_path / "run" / "sleeper.pid").exists()
