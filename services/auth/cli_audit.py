"""`secondopinion audit verify`: walk the audit log's hash chain; exit 1 when an entry was changed or removed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.auth.audit_chain import verify
from services.common import migrate
from services.common.db import get_engine


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


def add_audit_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("audit", help="the audit log").add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the hash chain; exit 1 naming each broken entry")
    check.set_defaults(run=audit_verify)
