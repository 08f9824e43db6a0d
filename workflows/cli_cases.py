"""`secondopinion case …`: operations find and steer cases from the console, as from the Temporal UI.

secondopinion case list [--status S]… [--urgency U] [--partner P] [--reviewer R] [--past-due] [--limit N]
secondopinion case show CASE_ID           status, what it waits for, due date, reviewer, timeline, decisions, alerts
secondopinion case hold CASE_ID --by ID --reason TEXT
secondopinion case resume CASE_ID --by ID
secondopinion case cancel CASE_ID --by ID --reason TEXT
secondopinion case decide-cost CASE_ID --by ID --choice accept|self_pay|decline
secondopinion case reconcile-identity CASE_ID --by ID --import-id ID --choice accept|reject --reason TEXT
secondopinion case reassign CASE_ID --by ID --reason TEXT [--reviewer-id ID]
secondopinion case document-communication CASE_ID --by ID --recipient NAME --recipient-role ROLE
        --method telephone|in_person --at 2026-12-06T14:05:00Z [--read-back]
secondopinion case close CASE_ID --by ID [--reason TEXT]
secondopinion case replay-check [--all] [--limit N]
        replay the running cases (--all: every case the server still holds) on this install's workflow code

Each decision is the case workflow's Temporal update of the same name (README, Operations): validated against
the case's state by the workflow itself, recorded there with who and why; a rejected one changes nothing and
exits 1 with the workflow's reason. `list` reads the search attributes only (no PHI); `show` reads the case's
queries through the encrypting data converter, so it needs the same CODEC_KEY as the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from contracts.decisions import (
    CancelCase,
    CloseCase,
    CostChoice,
    CostDecision,
    DocumentCommunication,
    HoldCase,
    IdentityChoice,
    IdentityDecision,
    ReassignReviewer,
    ResumeCase,
)
from contracts.models import CaseStatus, Urgency
from services.common.config import get_settings
from services.common.temporal import (
    ASSIGNED_REVIEWER,
    CASE_DUE_AT,
    CASE_STATUS,
    CASE_URGENCY,
    PARTNER_ID,
    SUBSPECIALTY,
    connect_temporal,
)

WORKFLOW_TYPE = "CaseWorkflow"
ANSWER_WITHIN = timedelta(seconds=15)  # a query or update the worker does not answer in this time fails
PLAIN_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$")  # what a search attribute value may be here
QUERIES = ("timeline", "decisions", "alerts", "review")


class CaseCommandError(Exception):
    """What went wrong, said for the operator; the command exits 1 with it."""


def workflow_id(case_id: str) -> str:
    return f"case-{case_id.removeprefix('case-')}"


def visibility_query(
    statuses: list[str],
    urgency: str | None = None,
    partner: str | None = None,
    reviewer: str | None = None,
    past_due_at: datetime | None = None,
) -> str:
    """The Temporal visibility query for these filters. Values are checked, never pasted raw into the query."""
    clauses = [f'WorkflowType = "{WORKFLOW_TYPE}"']
    if statuses:
        known = {s.value for s in CaseStatus}
        unknown = [s for s in statuses if s not in known]
        if unknown:
            raise CaseCommandError(
                f"no case status {', '.join(unknown)}; statuses are {', '.join(sorted(known))}"
            )
        quoted = ", ".join(f'"{status}"' for status in statuses)
        clauses.append(f"{CASE_STATUS.name} IN ({quoted})")
    if urgency is not None:
        clauses.append(f'{CASE_URGENCY.name} = "{urgency}"')
    for key, value, flag in ((PARTNER_ID, partner, "--partner"), (ASSIGNED_REVIEWER, reviewer, "--reviewer")):
        if value is None:
            continue
        if not PLAIN_VALUE.match(value):
            raise CaseCommandError(f"{flag} {value!r} is not an id (letters, digits, - _ . : @)")
        clauses.append(f'{key.name} = "{value}"')
    if past_due_at is not None:
        clauses.append(
            f'{CASE_DUE_AT.name} < "{past_due_at.astimezone(UTC).isoformat().replace("+00:00", "Z")}"'
        )
        clauses.append('ExecutionStatus = "Running"')
    return " AND ".join(clauses)


async def list_cases(client: Client, query: str, limit: int) -> list[dict[str, Any]]:
    """The cases the query finds, newest first: what the search attributes say (no PHI)."""
    found: list[dict[str, Any]] = []
    async for execution in client.list_workflows(query, limit=limit):
        attributes = execution.typed_search_attributes
        due = attributes.get(CASE_DUE_AT)
        found.append(
            {
                "case_id": execution.id.removeprefix("case-"),
                "status": attributes.get(CASE_STATUS),
                "running": execution.status == WorkflowExecutionStatus.RUNNING,
                "urgency": attributes.get(CASE_URGENCY),
                "subspecialty": attributes.get(SUBSPECIALTY),
                "partner_id": attributes.get(PARTNER_ID),
                "reviewer_id": attributes.get(ASSIGNED_REVIEWER),
                "due_at": _instant(due),
                "started_at": _instant(execution.start_time),
            }
        )
    return found


async def show_case(client: Client, case_id: str) -> dict[str, Any]:
    """The case as the Temporal UI shows it: status and what it waits for, then its queries."""
    handle = client.get_workflow_handle(workflow_id(case_id))
    description = await _answered(case_id, handle.describe(rpc_timeout=ANSWER_WITHIN))
    attributes = description.typed_search_attributes
    shown: dict[str, Any] = {
        "case_id": case_id.removeprefix("case-"),
        "status": attributes.get(CASE_STATUS),
        "running": description.status == WorkflowExecutionStatus.RUNNING,
        "urgency": attributes.get(CASE_URGENCY),
        "subspecialty": attributes.get(SUBSPECIALTY),
        "partner_id": attributes.get(PARTNER_ID),
        "due_at": _instant(attributes.get(CASE_DUE_AT)),
        "started_at": _instant(description.start_time),
        "closed_at": _instant(description.close_time),
    }
    metadata = await _answered(
        case_id, handle.query("__temporal_workflow_metadata", rpc_timeout=ANSWER_WITHIN)
    )
    shown["waiting_for"] = str(getattr(metadata, "current_details", "") or "")
    for name in QUERIES:
        shown[name] = await _answered(case_id, handle.query(name, rpc_timeout=ANSWER_WITHIN))
    return shown


async def decide(client: Client, case_id: str, update: str, decision: BaseModel) -> dict[str, Any]:
    """Send one decision to the case; the workflow validates it against the case's state and records it."""
    handle = client.get_workflow_handle(workflow_id(case_id))
    try:
        result = await _answered(
            case_id, handle.execute_update(update, decision, result_type=str, rpc_timeout=ANSWER_WITHIN)
        )
    except WorkflowUpdateFailedError as exc:
        reason = getattr(exc.cause, "message", None) or str(exc.cause or exc)
        raise CaseCommandError(f"case {case_id}: {update} refused: {reason}") from exc
    return {"case_id": case_id.removeprefix("case-"), "decision": update, "result": result}


async def _answered(case_id: str, call: Awaitable[Any]) -> Any:
    """`call`, with Temporal's errors said for an operator."""
    try:
        return await call
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND and "already completed" in exc.message:
            raise CaseCommandError(
                f"case {case_id} has ended (closed or cancelled); nothing can be decided on it any more"
            ) from exc
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise CaseCommandError(
                f"no case {case_id} on this Temporal namespace; `secondopinion case list` shows the cases"
            ) from exc
        if exc.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.UNAVAILABLE):
            raise CaseCommandError(
                f"case {case_id}: Temporal or the case worker did not answer within "
                f"{ANSWER_WITHIN.total_seconds():.0f} s; check that the worker runs (`make status`)"
            ) from exc
        raise CaseCommandError(f"case {case_id}: Temporal answered {exc.status.name}: {exc.message}") from exc


def _instant(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


# ---- the argparse group -----------------------------------------------------------------------------

# update name, the decision model, and the command-line fields that make it (flag -> model field)
DECISIONS: dict[str, tuple[str, type[BaseModel]]] = {
    "hold": ("hold", HoldCase),
    "resume": ("resume", ResumeCase),
    "cancel": ("cancel", CancelCase),
    "decide-cost": ("decide_cost", CostDecision),
    "reconcile-identity": ("reconcile_identity", IdentityDecision),
    "reassign": ("reassign_reviewer", ReassignReviewer),
    "document-communication": ("document_communication", DocumentCommunication),
    "close": ("close", CloseCase),
}
COMMUNICATION_FIELDS = ("recipient", "recipient_role", "method", "at", "read_back")


def decision_from(args: argparse.Namespace) -> BaseModel:
    """The update's input from the flags, validated here first so a typing error is said before anything is
    sent (the workflow validates again against the case's state)."""
    _, model = DECISIONS[args.command]
    given = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    if model is DocumentCommunication:
        given["communication"] = {k: getattr(args, k) for k in COMMUNICATION_FIELDS}
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise CaseCommandError(_said(exc)) from exc


def _said(exc: ValidationError) -> str:
    """pydantic's errors as the flags that caused them, without echoing the values given."""
    problems = []
    for error in exc.errors():
        where = [str(part) for part in error["loc"] if part != "communication"]
        flag = "--" + where[-1].replace("_", "-") if where else "input"
        problems.append(f"{flag}: {error['msg']}")
    return "; ".join(problems) + " (secondopinion case <command> --help shows each flag)"


def _run(work: Callable[[Client], Awaitable[Any]]) -> Any:
    async def connected() -> Any:
        settings = get_settings()
        try:
            client = await connect_temporal(settings)
        except RuntimeError as exc:
            raise CaseCommandError(
                f"could not reach Temporal at {settings.temporal_address} ({exc}); set TEMPORAL_ADDRESS"
            ) from exc
        return await work(client)

    try:
        return asyncio.run(connected())
    except CaseCommandError as exc:
        raise SystemExit(str(exc)) from exc


def case_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        query = visibility_query(
            args.status or [],
            urgency=args.urgency,
            partner=args.partner,
            reviewer=args.reviewer,
            past_due_at=datetime.now(UTC) if args.past_due else None,
        )
    except CaseCommandError as exc:
        raise SystemExit(str(exc)) from exc
    result: list[dict[str, Any]] = _run(lambda client: list_cases(client, query, args.limit))
    return result


def case_show(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = _run(lambda client: show_case(client, args.case_id))
    return result


def case_decide(args: argparse.Namespace) -> dict[str, Any]:
    try:
        decision = decision_from(args)
    except CaseCommandError as exc:
        raise SystemExit(str(exc)) from exc
    update, _ = DECISIONS[args.command]
    result: dict[str, Any] = _run(lambda client: decide(client, args.case_id, update, decision))
    return result


def case_replay_check(args: argparse.Namespace) -> dict[str, Any]:
    """Before a new worker version goes out, with that version installed: every running case must replay on it.
    Exits 1 naming the cases that do not (a worker running this code would fail their workflow tasks)."""
    from workflows.replay_check import replay_cases
    from workflows.worker import workflow_runner

    runner = workflow_runner(get_settings())
    query = visibility_query([]) + ("" if args.all else ' AND ExecutionStatus = "Running"')
    check = _run(lambda client: replay_cases(client, runner, query, limit=args.limit))
    if check.failed:
        named = "; ".join(f"{f['case_id']} ({f['error']})" for f in check.failed[:10])
        raise SystemExit(
            f"{len(check.failed)} of {check.replayed} case(s) do not replay on this workflow code: a worker running "
            f"it would fail their workflow tasks; keep the code they ran, or guard the change (README, 'Changing "
            f"the workflow'): {named}"
        )
    return {"replayed": check.replayed, "failed": []}


def add_case_group(groups: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    commands = groups.add_parser("case", help="find and steer cases (Temporal updates)").add_subparsers(
        dest="command", required=True
    )
    listing = commands.add_parser("list", help="cases by status, urgency, partner or reviewer (newest first)")
    listing.add_argument("--status", action="append", help="a case status; repeat for several")
    listing.add_argument("--urgency", choices=[u.value for u in Urgency])
    listing.add_argument("--partner", help="a partner id")
    listing.add_argument("--reviewer", help="the assigned specialist's id")
    listing.add_argument("--past-due", action="store_true", help="running cases whose due date has passed")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.set_defaults(run=case_list)
    show = commands.add_parser(
        "show", help="one case: status, what it waits for, timeline, decisions, alerts"
    )
    show.add_argument("case_id")
    show.set_defaults(run=case_show)

    def decision(name: str, help_: str, reason: str | None) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_)
        parser.add_argument("case_id")
        parser.add_argument("--by", required=True, help="who decides: a staff id, never a patient's name")
        if reason is not None:
            parser.add_argument("--reason", required=reason == "required", help="why (recorded on the case)")
        parser.set_defaults(run=case_decide)
        return parser

    decision("hold", "pause the case (the due date keeps running)", "required")
    decision("resume", "continue a case on hold", None)
    decision("cancel", "stop the case; every service withdraws its work, the partner is told", "required")
    cost = decision("decide-cost", "the patient's answer to the cost estimate", "optional")
    cost.add_argument("--choice", required=True, choices=[c.value for c in CostChoice])
    identity = decision("reconcile-identity", "accept or reject an import that did not match", "required")
    identity.add_argument("--import-id", required=True, help="the import waiting (see `case show`)")
    identity.add_argument("--choice", required=True, choices=[c.value for c in IdentityChoice])
    reassign = decision("reassign", "withdraw the current specialist and match again", "required")
    reassign.add_argument("--reviewer-id", help="a named specialist; default: the next best match")
    told = decision(
        "document-communication", "who was told of a critical result or major discrepancy, how, when", None
    )
    told.add_argument("--recipient", required=True, help='who was told, e.g. "Dr. Alex Kim"')
    told.add_argument("--recipient-role", required=True, help='e.g. "referring physician"')
    told.add_argument("--method", required=True, choices=["telephone", "in_person"])
    told.add_argument("--at", required=True, help="when, with its UTC offset: 2026-12-06T14:05:00Z")
    told.add_argument("--read-back", action="store_true", help="the recipient read the finding back")
    decision("close", "close after delivery: no further questions", "optional")
    check = commands.add_parser(
        "replay-check",
        help="replay the running cases on this install's workflow code (before a worker upgrade)",
    )
    check.add_argument("--all", action="store_true", help="closed cases too (those the server still holds)")
    check.add_argument("--limit", type=int, default=None, help="at most this many cases")
    check.set_defaults(run=case_replay_check)
