"""The crash test in small: 4 cases while the worker, a service, the broker and Temporal are killed with
`kill -9`, through the same command operators run (`python -m tests.chaos`), checked by its last line."""

from __future__ import annotations

import re
import subprocess
import sys

from services.common.config import PROJECT_ROOT

SUMMARY = re.compile(r"^chaos cases=(\d+) faults=(\d+) completed=(\d+) lost=(\d+) duplicated=(\d+)$")


def test_four_cases_survive_four_kills_with_nothing_lost_or_duplicated() -> None:
    command = [sys.executable, "-m", "tests.chaos", "--cases", "4", "--faults", "4", "--minutes", "2"]
    with subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as chaos:
        try:
            stdout, stderr = chaos.communicate(timeout=175)
        except subprocess.TimeoutExpired:
            chaos.terminate()  # the harness stops its broker, Temporal and services on SIGTERM
            stdout, stderr = chaos.communicate(timeout=60)
    done = subprocess.CompletedProcess(command, chaos.returncode, stdout, stderr)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    summary = SUMMARY.match(lines[-1])
    assert summary, f"last line is not the summary: {lines[-1]!r}\n{done.stderr[-2000:]}"
    cases, faults, completed, lost, duplicated = map(int, summary.groups())
    report = "\n".join(lines)
    assert (cases, faults) == (4, 4), report
    assert (completed, lost, duplicated) == (4, 0, 0), report
    assert done.returncode == 0, report
    assert "workflows still running: 0" in report
    # Each poison message injected on purpose sits in its dead-letter queue, and nothing else does.
    dead_letters = [line for line in lines if line.startswith("dead letters ")]
    assert len(dead_letters) == 3 and all(line.endswith(" ok") for line in dead_letters), report
