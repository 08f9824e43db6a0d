"""Decisions a partner sends to its case's workflow: cancel, consent received, follow-up question.

Exception tree::

    DecisionFailed
      + WorkflowRejected         (409: the workflow refused, e.g. the case is already closed)
      + WorkflowUnreachable      (503: Temporal is down or the workflow is not started yet; retry)
"""

from __future__ import annotations

from typing import Any

import structlog
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from contracts.decisions import CancelCase, ConsentReceived, FollowUpQuestion
from services.intake.handlers import workflow_id

log = structlog.get_logger(__name__)


class DecisionFailed(Exception):
    pass


class WorkflowRejected(DecisionFailed):
    pass


class WorkflowUnreachable(DecisionFailed):
    pass


def _reason(exc: WorkflowUpdateFailedError) -> str:
    cause = exc.cause
    return str(getattr(cause, "message", None) or cause or "the workflow rejected the request")


async def _update(client: Client | None, case_id: str, name: str, arg: object) -> None:
    if client is None:
        raise WorkflowUnreachable("the workflow service is not reachable; retry in a minute")
    handle = client.get_workflow_handle(workflow_id(case_id))
    try:
        await handle.execute_update(name, arg)
    except WorkflowUpdateFailedError as exc:
        raise WorkflowRejected(_reason(exc)) from exc
    except RPCError as exc:
        log.warning("workflow.update_failed", case_id=case_id, update=name, status=exc.status.name)
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise WorkflowUnreachable("the workflow service did not answer; retry in a minute") from exc
        ended = await _ended(handle)
        if ended:
            raise WorkflowRejected(
                f"the case's workflow has ended ({ended}), e.g. cancelled by a request at the same time; "
                f"GET /v1/cases/{case_id} shows how the case ended"
            ) from exc
        raise WorkflowUnreachable("the case's workflow is not started yet; retry in a minute") from exc


async def _ended(handle: WorkflowHandle[Any, Any]) -> str | None:
    """How the workflow ended, or None when there is no such workflow."""
    try:
        description = await handle.describe()
    except RPCError:
        return None
    status = description.status
    if status is None or status == WorkflowExecutionStatus.RUNNING:
        return None
    return status.name.lower()


async def cancel(client: Client | None, case_id: str, decision: CancelCase) -> None:
    await _update(client, case_id, "cancel", decision)


async def ask_question(client: Client | None, case_id: str, question: FollowUpQuestion) -> None:
    await _update(client, case_id, "ask_question", question)


async def consent_received(client: Client | None, case_id: str, consent: ConsentReceived) -> None:
    if client is None:
        raise WorkflowUnreachable("the workflow service is not reachable")
    try:
        await client.get_workflow_handle(workflow_id(case_id)).signal("consent_received", consent)
    except RPCError as exc:
        raise WorkflowUnreachable(f"signal not delivered ({exc.status.name})") from exc
