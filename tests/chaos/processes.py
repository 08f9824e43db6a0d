"""The chaos system's processes: its own RabbitMQ node, its own Temporal dev server, the services, the worker.

Each is started in its own process group so `kill -9` takes the whole thing (a broker is a shell script, an
Erlang VM and its helpers), and restarted with the same state directory (`--db-filename`, mnesia dir).
The machine's own broker on 5672 is never touched: the chaos node has its own name, ports and directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.stack import SERVICES, port_open, temporal_cli
from services.common.config import PROJECT_ROOT
from services.common.temporal import cache_flags, search_attribute_flags, sqlite_flags

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass
class Managed:
    """One restartable process: `kill()` is `kill -9` of its process group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready_port: int | None = None
    ready_url: str | None = None
    child: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0
    retired: bool = False  # set at teardown: never started again

    def start(self) -> None:
        if self.retired:
            return
        with open(self.log, "ab") as out:
            self.child = subprocess.Popen(
                self.argv,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def ready(self) -> bool:
        if self.ready_port is not None and not port_open(self.ready_port):
            return False
        if self.ready_url is not None:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.ready_url, timeout=2).status_code == 200
            return False
        return True

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.retired:
                raise RuntimeError(f"{self.name} was stopped")
            if not self.alive():
                self.start()  # died while starting (its broker or Temporal was down): try again
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f}s; see {self.log}")

    def retire(self) -> None:
        self.retired = True
        self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole process group, and wait until it is gone."""
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=10)
        # Helpers that left the group (none expected) would keep a port; wait for it to close.
        deadline = time.monotonic() + 10
        while self.ready_port is not None and port_open(self.ready_port) and time.monotonic() < deadline:
            time.sleep(0.2)


def rabbitmq_node(work: Path, ports: dict[str, int], base_env: dict[str, str]) -> Managed:
    """A private RabbitMQ node: own node name, AMQP and distribution ports, config, mnesia and logs."""
    state = work / "rabbitmq"
    state.mkdir(parents=True, exist_ok=True)
    (state / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{ports['amqp']}\nloopback_users = none\n"
    )
    (state / "enabled_plugins").write_text("[].\n")  # no management listener on 15672
    (state / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq/rabbitmq-env.conf
    env = {
        **base_env,
        "HOME": str(state),  # its own Erlang cookie
        "RABBITMQ_NODENAME": f"chaos-{ports['amqp']}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(ports["amqp"]),
        "RABBITMQ_DIST_PORT": str(ports["dist"]),
        "RABBITMQ_CONFIG_FILE": str(state / "rabbitmq.conf"),
        "RABBITMQ_CONF_ENV_FILE": str(state / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(state / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(state / "mnesia"),
        "RABBITMQ_LOG_BASE": str(state / "log"),
        "RABBITMQ_PID_FILE": str(state / "rabbitmq.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    return Managed("rabbitmq", [RABBITMQ_SERVER], env, work / "rabbitmq.log", ready_port=ports["amqp"])


def temporal_server(work: Path, ports: dict[str, int], base_env: dict[str, str]) -> Managed:
    argv = [
        temporal_cli(), "server", "start-dev", "--headless",
        "--db-filename", str(work / "temporal.db"), *sqlite_flags(), *cache_flags(),
        "--ip", "127.0.0.1", "--port", str(ports["temporal"]),
        "--http-port", str(ports["temporal_http"]), "--metrics-port", str(ports["temporal_metrics"]),
        "--log-level", "error",
        *search_attribute_flags(),
    ]  # fmt: skip
    return Managed("temporal", argv, base_env, work / "temporal.log", ready_port=ports["temporal"])


def application(work: Path, env: dict[str, str]) -> list[Managed]:
    """The four services, the worker and the payer sandbox, configured by `env`."""
    services = [
        Managed(
            name,
            [sys.executable, "-m", f"services.{name}.main"],
            env,
            work / f"{name}.log",
            ready_url=f"{env[name.upper() + '_URL']}/readyz",
        )
        for name in SERVICES
    ]
    payer = Managed(
        "payer-sandbox",
        [sys.executable, "-m", "tests.payer_sandbox", env["PAYER_SANDBOX_PORT"]],
        env,
        work / "payer-sandbox.log",
        ready_port=int(env["PAYER_SANDBOX_PORT"]),
    )
    worker = Managed("worker", [sys.executable, "-m", "workflows.worker"], env, work / "worker.log")
    return [payer, *services, worker]
