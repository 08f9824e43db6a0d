"""`secondopinion payer list|set`: how each payer is asked (operators; no secrets here, logins are settings).

secondopinion payer list
secondopinion payer set PAYER_ID [--connector x12|plan_rules] [--endpoint-url URL]
                                 [--core-envelope mime|soap] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session, col, select

from services.common import migrate
from services.common.config import get_settings
from services.common.db import get_engine
from services.insurance.models import InsurancePayer

ENVELOPES = ("mime", "soap")
CONNECTORS = ("x12", "plan_rules")


def _session() -> Session:
    engine = get_engine("insurance")
    migrate.upgrade("insurance", engine)
    return Session(engine)


def _shown(payer: InsurancePayer) -> dict[str, Any]:
    return payer.model_dump(
        include={"payer_id", "name", "connector", "endpoint_url", "timeout_seconds", "core_envelope"}
    )


def payer_list(_: argparse.Namespace) -> list[dict[str, Any]]:
    with _session() as session:
        return [
            _shown(p) for p in session.exec(select(InsurancePayer).order_by(col(InsurancePayer.payer_id)))
        ]


def payer_set(args: argparse.Namespace) -> dict[str, Any]:
    if args.endpoint_url is not None:
        parts = urlsplit(args.endpoint_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SystemExit("--endpoint-url must be the payer's https URL, e.g. https://payer.example/core")
        if parts.scheme == "http" and get_settings().env != "dev":
            raise SystemExit(
                "--endpoint-url must use https: CAQH CORE is spoken over TLS outside development"
            )
    if args.timeout is not None and not 0 < args.timeout <= 60:
        raise SystemExit(
            "--timeout must be more than 0 and at most 60 seconds (CORE real time answers in 20)"
        )
    with _session() as session:
        payer = session.get(InsurancePayer, args.payer_id)
        if payer is None:
            raise SystemExit(f"no payer {args.payer_id}; `secondopinion payer list` shows them")
        if args.connector is not None:
            payer.connector = args.connector
        if args.endpoint_url is not None:
            payer.endpoint_url = args.endpoint_url
        if args.core_envelope is not None:
            payer.core_envelope = args.core_envelope
        if args.timeout is not None:
            payer.timeout_seconds = args.timeout
        if payer.connector == "x12" and not payer.endpoint_url:
            raise SystemExit(f"payer {args.payer_id} asked by x12 needs --endpoint-url")
        session.add(payer)
        session.commit()
        session.refresh(payer)
        return _shown(payer)


def add_payer_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("payer", help="how each payer is asked").add_subparsers(
        dest="command", required=True
    )
    listing = commands.add_parser("list", help="every payer: connector, endpoint, CORE envelope, timeout")
    listing.set_defaults(run=payer_list)
    change = commands.add_parser("set", help="change how a payer is asked (only the options given)")
    change.add_argument("payer_id")
    change.add_argument("--connector", choices=CONNECTORS, default=None)
    change.add_argument("--endpoint-url", default=None, help="the payer's CAQH CORE real-time URL (https)")
    change.add_argument("--core-envelope", choices=ENVELOPES, default=None, help="mime (HTTP MIME) or soap")
    change.add_argument("--timeout", type=float, default=None, help="seconds to wait for an answer")
    change.set_defaults(run=payer_set)
