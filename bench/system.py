"""The real stack for one benchmark run: scripts.stack on free ports, its own PostgreSQL database and
RabbitMQ vhost, DATA_DIR in a tmp dir; plus the partner key and the processes' memory as /proc shows it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scripts import demo, stack
from services.common.config import PROJECT_ROOT, Settings, get_settings
from tests.infra import free_ports, postgres_database, rabbitmq_vhost

PORTS = ("intake", "records", "insurance", "review", "temporal", "ui", "metrics", "codec", "payer", "scp")


@dataclass(frozen=True)
class System:
    settings: Settings
    partner_id: str
    api_key: str
    operations_key: str  # accepts offers for the specialist (`?reviewer=`), as the operations desk may
    scratch: Path  # a tmp dir for studies and ceilings, removed with the system
    signing_keys: dict[str, str] = field(default_factory=dict)  # reviewer -> the key findings are signed with

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def operations_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operations_key}"}

    def pid(self, process: str) -> int:
        pid = stack.running_pid(self.settings, process)
        if pid is None:
            raise RuntimeError(f"{process} is not running; see {self.settings.data_dir}/logs/{process}.log")
        return pid


# Settings the benchmarks need that differ from the defaults, each for a stated reason.
BENCH_ENV = {
    "LOG_LEVEL": "WARNING",
    # The worker as deployed; the test suite's environment turns the sandbox on, the smoke run keeps this.
    "WORKFLOW_SANDBOX": "false",
    # The per-key rate limit (50/s) is a policy for partners; the benchmarks measure capacity.
    "AUTH_RATE_PER_SECOND": "0",  # a log line per request would measure the disk, not the service
    # The 1 GB CD arrives as one ZIP; the default 512 MiB per-file limit would refuse it with a 413.
    "MAX_UPLOAD_BYTES": str(2 * 1024**3),
    "RECORDS_RETRIEVAL_TIMEOUT_SECONDS": "120",
}


@contextlib.contextmanager
def running_system() -> Iterator[System]:
    """Start the whole system as processes; stop it and drop its database and vhost afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        postgres_database() as database_url,
        rabbitmq_vhost() as amqp_url,
    ):
        ports = free_ports(PORTS)
        env = {
            **BENCH_ENV,
            "DATA_DIR": str(Path(tmp) / "data"),
            "DATABASE_URL": database_url,
            "AMQP_URL": amqp_url,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
            "TEMPORAL_UI_PORT": str(ports["ui"]),
            "TEMPORAL_METRICS_PORT": str(ports["metrics"]),  # the server's own counters (bench.server_work)
            "CODEC_SERVER_PORT": str(ports["codec"]),
            "PAYER_SANDBOX_PORT": str(ports["payer"]),
            "RECORDS_SCP_PORT": str(ports["scp"]),
        }
        for name in stack.SERVICES:
            env[f"{name.upper()}_PORT"] = str(ports[name])
            env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{ports[name]}"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        get_settings.cache_clear()
        settings = Settings()
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        try:
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
                stack.up(settings)
            partner = demo.demo_partner(settings)
            yield System(settings, partner["partner_id"], partner["api_key"], operations_key(), scratch)
        finally:
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
                stack.down(settings)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            get_settings.cache_clear()


def operations_key() -> str:
    """A staff key with the operations role, made with the operators' console command."""
    command = [sys.executable, "-m", "services.common.cli", "key", "create", "--role", "operations"]
    created = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, check=False)
    if created.returncode != 0:
        raise RuntimeError(f"could not create an operations key: {created.stderr[-500:] or created.stdout}")
    return str(json.loads(created.stdout)["api_key"])


def rss_bytes(pid: int) -> int:
    """Resident set size of one process now (VmRSS), 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (the records service parses headers in child processes)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                kids = (task / "children").read_text().split()
                found += [int(k) for k in kids]
                frontier += [int(k) for k in kids]
    return found


class PeakRss:
    """Samples a process's RSS (and its process tree's) every 20 ms while the `with` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            own = rss_bytes(self.pid)
            self.peak = max(self.peak, own)
            self.tree_peak = max(self.tree_peak, own + sum(rss_bytes(c) for c in children(self.pid)))

    def __enter__(self) -> PeakRss:
        self.peak = self.tree_peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The machine's shared servers the stack uses, by their process name (/proc/<pid>/comm).
SERVERS = {"postgres": "postgres", "rabbitmq": "beam.smp"}


def cpu_seconds_of(pid: int) -> float:
    """User plus system CPU seconds one process has used so far; 0 once it is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def _pids_named(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
    return pids


def cpu_snapshot(system: System) -> dict[str, float]:
    """CPU seconds used so far by each of the stack's processes (with their children), by PostgreSQL and
    RabbitMQ (all their processes: on a shared machine that includes other clients' work), and by this
    benchmark process (the load generator, and the ceiling's bare worker)."""
    snapshot: dict[str, float] = {}
    for process in stack.processes(system.settings):
        pid = stack.running_pid(system.settings, process.name)
        if pid:
            snapshot[process.name] = cpu_seconds_of(pid) + sum(cpu_seconds_of(c) for c in children(pid))
    for name, comm in SERVERS.items():
        snapshot[name] = sum(cpu_seconds_of(pid) for pid in _pids_named(comm))
    snapshot["bench"] = cpu_seconds_of(os.getpid())
    return snapshot


class CpuUse:
    """CPU milliseconds per unit of work (a case, a request) that each process used while the `with` block
    ran: where the machine's cores went, beside the rate. Processes using under 0.05 ms per unit are left
    out."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuUse:
        self._before = cpu_snapshot(self.system)
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_snapshot(self.system)
        self.used = {name: after[name] - self._before.get(name, after[name]) for name in after}

    def per_unit(self, units: int) -> dict[str, float]:
        """Milliseconds per unit by process, largest first."""
        ms_each = {name: 1000 * seconds / max(units, 1) for name, seconds in self.used.items()}
        return dict(sorted(((n, round(v, 1)) for n, v in ms_each.items() if v >= 0.05), key=lambda x: -x[1]))

    @staticmethod
    def describe(per_unit: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:g}" for name, value in per_unit.items())
