"""Start and stop the whole system locally: Temporal dev server, four services, the worker (and the ATNA
audit feed when AUDIT_ATNA_URL is set).

    python -m scripts.stack up | down | status

Idempotent: `up` starts only what is not already running. Pid files and logs live under DATA_DIR/run and
DATA_DIR/logs. Every setting comes from the environment (see services/common/config.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlmodel import Session

from services.auth.atna_forward import AtnaSettings
from services.auth.models import ApiKey, Role
from services.auth.partners import issue_key
from services.common import migrate
from services.common.config import PROJECT_ROOT, Settings, get_settings
from services.common.db import make_engine
from services.common.temporal import cache_flags, search_attribute_flags, sqlite_flags

SERVICES = ("intake", "records", "insurance", "review")


@dataclass(frozen=True)
class Process:
    name: str
    argv: list[str]
    ready_url: str | None = None
    ready_port: int | None = None


def temporal_cli() -> str:
    beside = Path(sys.executable).parent / "temporal"
    return str(beside) if beside.exists() else "temporal"


def processes(settings: Settings, *, every: bool = False) -> list[Process]:
    """What `up` starts; `every`: also what it starts only when configured (for `down`)."""
    host, port = settings.temporal_address.rsplit(":", 1)
    temporal = Process(
        "temporal",
        [
            temporal_cli(), "server", "start-dev",
            "--db-filename", str(settings.data_dir / "temporal.db"), *sqlite_flags(), *cache_flags(),
            "--ip", host, "--port", port, "--ui-port", str(settings.temporal_ui_port),
            "--log-level", "warn",
            *(["--metrics-port", str(settings.temporal_metrics_port)] if settings.temporal_metrics_port else []),
            "--ui-codec-endpoint", f"http://{settings.host}:{settings.codec_server_port}",
            *search_attribute_flags(),
        ],
        ready_port=int(port),
    )  # fmt: skip
    services = [
        Process(
            name,
            [sys.executable, "-m", f"services.{name}.main"],
            ready_url=f"http://{settings.host}:{getattr(settings, f'{name}_port')}/readyz",
        )
        for name in SERVICES
    ]
    codec = Process(
        "codec-server",
        [sys.executable, "-m", "services.common.codec_server"],
        ready_url=f"http://{settings.host}:{settings.codec_server_port}/healthz",
    )
    # The payer sandbox answers X12 270s for the plans configured with the X12 connector (local stack only).
    payer = Process(
        "payer-sandbox",
        [sys.executable, "-m", "tests.payer_sandbox", str(settings.payer_sandbox_port)],
        ready_port=settings.payer_sandbox_port,
    )
    worker = Process("worker", [sys.executable, "-m", "workflows.worker"])
    # The IHE ATNA feed, when a repository is configured (AUDIT_ATNA_URL): the audit log to the hospital.
    forward = Process("audit-forward", [sys.executable, "-m", "services.common.cli", "audit", "forward"])
    return [temporal, codec, payer, *services, worker, *([forward] if every or AtnaSettings().url else [])]


def _pid_file(settings: Settings, name: str) -> Path:
    path = settings.data_dir / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{name}.pid"


def running_pid(settings: Settings, name: str) -> int | None:
    pid_file = _pid_file(settings, name)
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    _reap(pid)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def _reap(pid: int) -> None:
    """Collect `pid` if it is this process's own child and has exited: a zombie still answers kill(pid, 0),
    so `down` called by the process that ran `up` (a test, a benchmark) would wait out its whole grace
    period for each process that had already stopped."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def port_open(port: int) -> bool:
    """Whether something listens on the loopback `port`. A connection that reached only itself is not a
    listener: with nobody on a port of the ephemeral range, the kernel may pick that very port as the
    connection's own and connect it to itself (a TCP self-connect). A chaos run took a killed Temporal
    server's port for open that way, and the gRPC client then read its own HTTP/2 preface back
    (FRAME_SIZE_ERROR)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        return reaches_another(sock)
    return False


def reaches_another(sock: socket.socket) -> bool:
    """Whether a connected socket reached another socket, not itself (a TCP self-connect)."""
    return bool(sock.getsockname() != sock.getpeername())


def _ready(process: Process) -> bool:
    if process.ready_port is not None:
        return port_open(process.ready_port)
    if process.ready_url is not None:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(process.ready_url, timeout=1).status_code == 200
        return False
    return True


def local_report_key(settings: Settings) -> str:
    """The operations key the local stack's intake reads reports with (INTAKE_REPORT_KEY: its HL7 v2 sender puts
    the report in each ORU^R01): issued once, as an operator would with `secondopinion key create --role
    operations`, and kept in DATA_DIR/run (mode 0600) with the database it is valid in; issued again when that
    database no longer has it (reset, or the key revoked). A deployment sets INTAKE_REPORT_KEY itself."""
    path = settings.data_dir / "run" / "intake-report-key.json"
    engine = make_engine("auth", settings)  # the stack's database, not whichever this process met first
    migrate.upgrade("auth", engine)
    with Session(engine) as session:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = json.loads(path.read_text())
            row = session.get(ApiKey, kept["key_id"])
            if row is not None and row.revoked_at is None and row.role == Role.OPERATIONS:
                return str(kept["api_key"])
        issued = issue_key(session, Role.OPERATIONS, None, label="intake: the HL7 v2 sender reads reports")
        session.commit()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps({"key_id": issued.key_id, "api_key": issued.api_key}))
    return issued.api_key


def start(process: Process, settings: Settings) -> int:
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if process.name == "intake" and not settings.intake_report_key:
        env["INTAKE_REPORT_KEY"] = local_report_key(settings)
    with open(logs / f"{process.name}.log", "ab") as log:
        child = subprocess.Popen(
            process.argv,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _pid_file(settings, process.name).write_text(str(child.pid))
    return child.pid


def wait_ready(process: Process, settings: Settings, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(process):
            return
        if running_pid(settings, process.name) is None:
            raise SystemExit(
                f"{process.name} exited during start; see {settings.data_dir / 'logs' / (process.name + '.log')}"
            )
        time.sleep(0.3)
    raise SystemExit(
        f"{process.name} was not ready within {timeout:.0f}s; see its log under {settings.data_dir}/logs"
    )


def up(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for process in processes(settings):
        if running_pid(settings, process.name) is None:
            pid = start(process, settings)
            print(f"started {process.name} (pid {pid})")
        else:
            print(f"{process.name} already running")
        wait_ready(process, settings)


def down(settings: Settings) -> None:
    for process in reversed(processes(settings, every=True)):
        pid = running_pid(settings, process.name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if running_pid(settings, process.name) is None:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _pid_file(settings, process.name).unlink(missing_ok=True)
        print(f"stopped {process.name}")


def status(settings: Settings) -> None:
    for process in processes(settings):
        pid = running_pid(settings, process.name)
        state = "down" if pid is None else ("ready" if _ready(process) else "starting")
        print(f"{process.name:10} {state:8} {pid or ''}")


def main(argv: list[str]) -> None:
    settings = get_settings()
    commands = {"up": up, "down": down, "status": status}
    if len(argv) != 1 or argv[0] not in commands:
        raise SystemExit("usage: python -m scripts.stack up|down|status")
    commands[argv[0]](settings)


if __name__ == "__main__":
    main(sys.argv[1:])
