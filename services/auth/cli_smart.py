"""`secondopinion partner register-client` and `revoke-client`: SMART Backend Services clients.

secondopinion partner register-client PARTNER_ID --jwks FILE|--jwks-uri URL --scope "system/ServiceRequest.write system/Task.read"
    prints {"client_id", "partner_id", "scopes", "key_ids", "token_endpoint"}
secondopinion partner set-client-keys CLIENT_ID --jwks FILE   replace its keys (rotation)
secondopinion partner revoke-client CLIENT_ID    its assertions are refused, its tokens stop working at once
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sqlmodel import Session

from services.auth import smart
from services.auth.smart_api import token_endpoint
from services.auth.smart_jwks import fetch_jwks
from services.common import migrate
from services.common.config import get_settings
from services.common.db import get_engine


def _session() -> Session:
    engine = get_engine("auth")
    migrate.upgrade("auth", engine)
    return Session(engine)


def _jwks(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"cannot read the JWKS from {path} ({type(exc).__name__}); give a JSON file"
        ) from exc


def register_client(args: argparse.Namespace) -> dict[str, Any]:
    jwks = _jwks(args.jwks) if args.jwks else None
    env = get_settings().env
    with _session() as session:
        try:
            client = smart.register_client(
                session,
                args.partner_id,
                jwks,
                args.scope,
                label=args.label,
                client_id=args.client_id,
                jwks_uri=args.jwks_uri,
                fetch=lambda url: fetch_jwks(url, env),
            )
        except smart.ClientInvalid as exc:
            raise SystemExit(str(exc)) from exc
        session.commit()
        return {
            "client_id": client.id,
            "partner_id": client.partner_id,
            "scopes": client.scopes,
            "key_ids": [k["kid"] for k in json.loads(client.jwks)["keys"]],
            "token_endpoint": token_endpoint(get_settings()),
        }


def set_client_keys(args: argparse.Namespace) -> dict[str, Any]:
    jwks = _jwks(args.jwks)
    with _session() as session:
        try:
            client = smart.replace_keys(session, args.client_id, jwks)
        except smart.ClientInvalid as exc:
            raise SystemExit(str(exc)) from exc
        if client is None:
            raise SystemExit(f"no client {args.client_id}")
        session.commit()
        return {"client_id": client.id, "key_ids": [k["kid"] for k in json.loads(client.jwks)["keys"]]}


def revoke_client(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        if not smart.revoke_client(session, args.client_id):
            raise SystemExit(f"no client {args.client_id}")
        session.commit()
    return {"client_id": args.client_id, "status": "revoked"}


def add_smart_commands(partner: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    register = partner.add_parser(
        "register-client", help="a SMART Backend Services client of the partner, with its public keys"
    )
    register.add_argument("partner_id")
    keys = register.add_mutually_exclusive_group(required=True)
    keys.add_argument("--jwks", help="a JSON file: the client's JSON Web Key Set (public keys)")
    keys.add_argument("--jwks-uri", help="where the client publishes its JWKS (HTTPS, a public address)")
    register.add_argument(
        "--scope",
        required=True,
        help='the scopes it may ask for, e.g. "system/ServiceRequest.write system/Task.read"',
    )
    register.add_argument(
        "--client-id", default=None, help="a chosen client id; default: from the partner id"
    )
    register.add_argument("--label", default="", help="e.g. the EHR instance (no names of people)")
    register.set_defaults(run=register_client)
    revoke = partner.add_parser(
        "revoke-client", help="revoke a SMART client; its tokens stop working at once"
    )
    revoke.add_argument("client_id")
    revoke.set_defaults(run=revoke_client)
