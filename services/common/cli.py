"""`secondopinion`: the operators' console command.

secondopinion partner create --name NAME      prints {"partner_id", "api_key", "webhook_secret"}
secondopinion partner rotate-key KEY_ID       prints {"key_id", "api_key"}; the old key stops working
secondopinion partner revoke-key KEY_ID
secondopinion key create --role operations    a staff key (specialist or operations)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sqlmodel import Session

from services.auth.models import Role
from services.auth.partners import create_partner, issue_key, revoke_key, rotate_key, rotate_webhook_secret
from services.common import migrate
from services.common.db import get_engine


def _session() -> Session:
    engine = get_engine("auth")
    migrate.upgrade("auth", engine)
    return Session(engine)


def partner_create(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        try:
            credentials = create_partner(session, args.name, partner_id=args.partner_id)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        session.commit()
    return {
        "partner_id": credentials.partner_id,
        "api_key": credentials.api_key,
        "webhook_secret": credentials.webhook_secret,
    }


def partner_rotate_key(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        issued = rotate_key(session, args.key_id)
        if issued is None:
            raise SystemExit(f"no active key {args.key_id}; list keys with the partner API")
        session.commit()
    return {"key_id": issued.key_id, "api_key": issued.api_key}


def partner_revoke_key(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        if not revoke_key(session, args.key_id):
            raise SystemExit(f"no key {args.key_id}")
        session.commit()
    return {"key_id": args.key_id, "revoked": "true"}


def partner_rotate_webhook_secret(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        secret = rotate_webhook_secret(session, args.partner_id)
        if secret is None:
            raise SystemExit(f"no partner {args.partner_id}")
        session.commit()
    return {"partner_id": args.partner_id, "webhook_secret": secret}


def key_create(args: argparse.Namespace) -> dict[str, str]:
    with _session() as session:
        issued = issue_key(session, Role(args.role), None, label=args.label)
        session.commit()
    return {"key_id": issued.key_id, "api_key": issued.api_key, "role": issued.role.value}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="secondopinion", description="Second-opinion platform operations.")
    groups = root.add_subparsers(dest="group", required=True)

    partner = groups.add_parser("partner", help="partners and their API keys").add_subparsers(
        dest="command", required=True
    )
    create = partner.add_parser("create", help="a new partner with one API key and a webhook secret")
    create.add_argument("--name", required=True, help="the partner's display name")
    create.add_argument(
        "--partner-id", default=None, help="a chosen id (lowercase, digits, dashes); default: from the name"
    )
    create.set_defaults(run=partner_create)
    rotate = partner.add_parser("rotate-key", help="replace a key; the old one stops working")
    rotate.add_argument("key_id")
    rotate.set_defaults(run=partner_rotate_key)
    revoke = partner.add_parser("revoke-key", help="revoke a key")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=partner_revoke_key)
    secret = partner.add_parser("rotate-webhook-secret", help="a new webhook secret; the old one works 24 h")
    secret.add_argument("partner_id")
    secret.set_defaults(run=partner_rotate_webhook_secret)

    key = groups.add_parser("key", help="staff keys").add_subparsers(dest="command", required=True)
    staff = key.add_parser("create", help="a key for a specialist or operations user")
    staff.add_argument("--role", required=True, choices=[Role.SPECIALIST.value, Role.OPERATIONS.value])
    staff.add_argument("--label", default="", help="whose key this is (a staff id, not a name)")
    staff.set_defaults(run=key_create)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    json.dump(args.run(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
