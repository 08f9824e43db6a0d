"""`secondopinion`: the operators' console command.

secondopinion partner create --name NAME      prints {"partner_id", "api_key", "webhook_secret"}
secondopinion partner rotate-key KEY_ID       prints {"key_id", "api_key"}; the old key stops working
secondopinion partner revoke-key KEY_ID
secondopinion partner register-client PARTNER_ID --jwks FILE --scope "system/…"   a SMART Backend Services client
secondopinion partner set-client-keys CLIENT_ID --jwks FILE   replace its keys (rotation)
secondopinion partner revoke-client CLIENT_ID
secondopinion key create --role operations    a staff key (specialist or operations)
secondopinion key create --role specialist --specialist-id spec-gyn-1   a key acting as that specialist
secondopinion audit verify                    check the audit log's hash chain (exit 1 when broken)
secondopinion audit forward                   the IHE ATNA feed to the hospital's audit repository (AUDIT_ATNA_*)
secondopinion audit forward-status            the feed's cursor and backlog
secondopinion dlq list QUEUE                  dead letters: id, type, reason, count, first seen
secondopinion dlq show QUEUE ID               headers and the envelope without `data`
secondopinion dlq replay QUEUE --id ID|--all  re-publish (confirmed) and then remove from the DLQ
secondopinion dlq purge QUEUE --id ID         drop one dead letter
secondopinion payer list                      how each payer is asked (connector, endpoint, CORE envelope)
secondopinion payer set PAYER_ID --core-envelope soap --endpoint-url https://…   change it
secondopinion case list|show|hold|resume|cancel|decide-cost|reconcile-identity|reassign|document-communication|close
                                              find and steer cases (workflows/cli_cases.py)
secondopinion specialist list|show|add|update|deactivate   the specialist directory (services/review/cli_specialists.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sqlmodel import Session

from services.auth.cli_audit import add_audit_group
from services.auth.cli_smart import add_smart_commands
from services.auth.models import Role
from services.auth.partners import create_partner, issue_key, revoke_key, rotate_key, rotate_webhook_secret
from services.common import dlq, migrate
from services.common.config import get_settings
from services.common.db import get_engine
from services.insurance.cli_payers import add_payer_group
from services.review.cli_specialists import add_specialist_group
from workflows.cli_cases import add_case_group


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
        try:
            issued = issue_key(
                session, Role(args.role), None, label=args.label, specialist_id=args.specialist_id
            )
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        session.commit()
    shown = {"key_id": issued.key_id, "api_key": issued.api_key, "role": issued.role.value}
    return shown | ({"specialist_id": issued.specialist_id} if issued.specialist_id else {})


def _dead_letters(run: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    def guarded(args: argparse.Namespace) -> Any:
        try:
            return run(args)
        except dlq.DeadLetterError as exc:
            raise SystemExit(str(exc)) from exc

    return guarded


def dlq_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [letter.summary() for letter in dlq.dead_letters(get_settings(), args.queue)]


def dlq_show(args: argparse.Namespace) -> dict[str, Any]:
    return dlq.show(get_settings(), args.queue, args.message_id)


def dlq_replay(args: argparse.Namespace) -> dict[str, Any]:
    replayed = dlq.replay(get_settings(), args.queue, None if args.all else [args.id])
    return {"queue": args.queue, "replayed": replayed}


def dlq_purge(args: argparse.Namespace) -> dict[str, str]:
    return {"queue": args.queue, "purged": dlq.purge(get_settings(), args.queue, args.id)}


def add_dlq_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("dlq", help="dead-letter queues").add_subparsers(
        dest="command", required=True
    )
    listing = commands.add_parser("list", help="dead letters of a queue (never their data)")
    listing.add_argument("queue", help="a consumer queue (insurance) or its DLQ (insurance.dlq)")
    listing.set_defaults(run=_dead_letters(dlq_list))
    show = commands.add_parser("show", help="one dead letter's headers and envelope, without data")
    show.add_argument("queue")
    show.add_argument("message_id")
    show.set_defaults(run=_dead_letters(dlq_show))
    replay = commands.add_parser("replay", help="re-publish to the original exchange, then remove")
    replay.add_argument("queue")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the message id (from dlq list)")
    which.add_argument("--all", action="store_true", help="every dead letter of the queue")
    replay.set_defaults(run=_dead_letters(dlq_replay))
    purge = commands.add_parser("purge", help="drop one dead letter for good")
    purge.add_argument("queue")
    purge.add_argument("--id", required=True, help="the message id (from dlq list)")
    purge.set_defaults(run=_dead_letters(dlq_purge))


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
    add_smart_commands(partner)

    key = groups.add_parser("key", help="staff keys").add_subparsers(dest="command", required=True)
    staff = key.add_parser("create", help="a key for a specialist or operations user")
    staff.add_argument("--role", required=True, choices=[Role.SPECIALIST.value, Role.OPERATIONS.value])
    staff.add_argument("--label", default="", help="whose key this is (a staff id, not a name)")
    staff.add_argument(
        "--specialist-id", default=None, help="for --role specialist: the directory id the key acts as"
    )
    staff.set_defaults(run=key_create)
    add_audit_group(groups)

    add_dlq_group(groups)
    add_payer_group(groups)
    add_case_group(groups)
    add_specialist_group(groups)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    json.dump(args.run(args), sys.stdout)
    sys.stdout.write("\n")


def console() -> None:
    """The `secondopinion` command: `main`, then exit with its own status. temporalio (used by `case`) can
    abort the interpreter at exit (sdk-python #300, "PyGILState_Release", 134) after a command that succeeded,
    so once the output is flushed the process leaves without the interpreter's shutdown."""
    try:
        main()
        status = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 -- shown as Python shows it, then the same exit
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    console()
