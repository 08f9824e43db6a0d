"""`secondopinion specialist …`: the specialist directory from the console, as operations' keys change it over
`/v1/specialists` (the same rules and checks: services.review.directory).

secondopinion specialist list [--active]
secondopinion specialist show SPECIALIST_ID
secondopinion specialist add --file spec.json        the POST /v1/specialists body (with "id"); - reads stdin
secondopinion specialist update SPECIALIST_ID --file spec.json   the whole entry, as PUT /v1/specialists/{id}
secondopinion specialist deactivate SPECIALIST_ID     out of matching; lists the offers and reviews they still hold

A specialist's own key comes from `secondopinion key create --role specialist --specialist-id ID`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlmodel import Session, col, select

from contracts.validation import problems_of
from services.common import migrate
from services.common.db import get_engine
from services.review import directory
from services.review.directory import SpecialistCreate, SpecialistIn
from services.review.models import Review, Specialist, SpecialistPublic

M = TypeVar("M", bound=BaseModel)
HELD = ("offered", "accepted")  # reviews still to do: an offer to answer, a case to read


def _session() -> Session:
    engine = get_engine("review")
    migrate.upgrade("review", engine)
    return Session(engine)


def _shown(specialist: Specialist) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(SpecialistPublic.model_validate(specialist).model_dump_json())
    return shown


def _entry(model: type[M], source: str) -> M:
    """The directory entry in the file (or stdin for -), checked as the API checks a body."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"--file {source}: {exc.strerror or exc}") from exc
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        problems = problems_of(exc, whole="the entry")
        raise SystemExit(f"--file {source} is not a directory entry: {problems}") from exc


def specialist_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    query = select(Specialist).order_by(col(Specialist.id))
    if args.active:
        query = query.where(col(Specialist.active).is_(True))
    with _session() as session:
        return [_shown(s) for s in session.exec(query)]


def specialist_show(args: argparse.Namespace) -> dict[str, Any]:
    with _session() as session:
        try:
            return _shown(directory.found(session, args.specialist_id))
        except directory.NotInDirectory as exc:
            raise SystemExit(f"{exc}; `secondopinion specialist list` shows them") from exc


def specialist_add(args: argparse.Namespace) -> dict[str, Any]:
    body = _entry(SpecialistCreate, args.file)
    with _session() as session:
        try:
            return _shown(directory.add(session, body))
        except directory.AlreadyInDirectory as exc:
            raise SystemExit(f"{exc}; `secondopinion specialist update {body.id}` changes it") from exc


def specialist_update(args: argparse.Namespace) -> dict[str, Any]:
    body = _entry(SpecialistIn, args.file)
    with _session() as session:
        try:
            return _shown(directory.replace(session, args.specialist_id, body))
        except directory.NotInDirectory as exc:
            raise SystemExit(f"{exc}; `secondopinion specialist add` adds one") from exc


def specialist_deactivate(args: argparse.Namespace) -> dict[str, Any]:
    """Out of matching from now on. The offers and reviews they hold stay theirs: listed with the output, for
    operations to reassign (`secondopinion case reassign`) or leave with them."""
    with _session() as session:
        try:
            shown = _shown(directory.deactivate(session, args.specialist_id))
        except directory.NotInDirectory as exc:
            raise SystemExit(f"{exc}; `secondopinion specialist list` shows them") from exc
        held = session.exec(
            select(Review.case_id, Review.status)
            .where(Review.reviewer_id == args.specialist_id, col(Review.status).in_(HELD))
            .order_by(col(Review.due_at))
        ).all()
    return shown | {"still_holds": [{"case_id": case_id, "review": status} for case_id, status in held]}


def add_specialist_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("specialist", help="the specialist directory").add_subparsers(
        dest="command", required=True
    )
    listing = commands.add_parser("list", help="every specialist, by id")
    listing.add_argument("--active", action="store_true", help="only those matching may offer cases to")
    listing.set_defaults(run=specialist_list)
    show = commands.add_parser("show", help="one specialist's entry")
    show.add_argument("specialist_id")
    show.set_defaults(run=specialist_show)
    add = commands.add_parser("add", help="a new specialist (JSON: the POST /v1/specialists body)")
    add.add_argument("--file", required=True, help="a JSON file, or - for stdin")
    add.set_defaults(run=specialist_add)
    update = commands.add_parser("update", help="replace an entry (JSON: the PUT /v1/specialists/{id} body)")
    update.add_argument("specialist_id")
    update.add_argument("--file", required=True, help="a JSON file, or - for stdin")
    update.set_defaults(run=specialist_update)
    deactivate = commands.add_parser("deactivate", help="take a specialist out of matching")
    deactivate.add_argument("specialist_id")
    deactivate.set_defaults(run=specialist_deactivate)
