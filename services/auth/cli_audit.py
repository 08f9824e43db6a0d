"""`secondopinion audit verify|forward|forward-status`: the audit log's hash chain and its IHE ATNA feed.

audit verify           walk the hash chain; exit 1 naming each changed or removed entry
audit forward          forward the log to the ATNA audit record repository (AUDIT_ATNA_*) until stopped
audit forward-status   the feed's cursor and backlog (how many entries wait, the oldest's time)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from prometheus_client import start_http_server

from services.auth.atna_forward import backlog, get_atna_settings, run_forever
from services.auth.audit_chain import verify
from services.common import migrate
from services.common.config import get_settings
from services.common.db import get_engine
from services.common.logging import configure_logging


def audit_verify(_: argparse.Namespace) -> dict[str, Any]:
    engine = get_engine("auth")
    migrate.upgrade("auth", engine)
    report = verify(engine)
    result: dict[str, Any] = {
        "intact": report.intact,
        "entries": report.entries,
        "unchained": report.unchained,
        "head": report.head,
        "breaks": [{"entry_id": b.entry_id, "reason": b.reason} for b in report.breaks],
    }
    if not report.intact:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        raise SystemExit(1)
    return result


def audit_forward(_: argparse.Namespace) -> dict[str, Any]:
    """Run the ATNA feed until SIGTERM or SIGINT; several may run, one forwards (the others stand by)."""
    settings = get_atna_settings()
    problems = settings.problems(get_settings().env)
    if problems:
        raise SystemExit("the ATNA feed cannot start:\n- " + "\n- ".join(problems))
    configure_logging("audit-forward")
    engine = get_engine("auth")
    migrate.upgrade("auth", engine)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_forever(engine, settings, stop)
    return backlog(engine, settings)


def audit_forward_status(_: argparse.Namespace) -> dict[str, Any]:
    engine = get_engine("auth")
    migrate.upgrade("auth", engine)
    return backlog(engine, get_atna_settings())


def add_audit_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("audit", help="the audit log").add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the hash chain; exit 1 naming each broken entry")
    check.set_defaults(run=audit_verify)
    forward = commands.add_parser(
        "forward", help="forward the log to the IHE ATNA repository (AUDIT_ATNA_URL)"
    )
    forward.set_defaults(run=audit_forward)
    status = commands.add_parser("forward-status", help="the ATNA feed's cursor and backlog")
    status.set_defaults(run=audit_forward_status)
