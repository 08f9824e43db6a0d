"""A failure's message and stack trace are encrypted like payloads: an exception's text may quote the values
that caused it (a pydantic `input_value`), and Temporal keeps failures in history and shows them in its UI.
Our clients decode them; anyone reading the history without the codec sees "Encoded failure"."""

from __future__ import annotations

import uuid

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from services.common.config import Settings

SECRET = "MRN-0042 Jane Doe, born 1984-03-02"


@workflow.defn(sandboxed=False)
class FailsWithValues:
    @workflow.run
    async def run(self) -> None:
        raise ApplicationError(f"could not read the event: {SECRET}", non_retryable=True)


async def test_a_failure_is_stored_encrypted_and_read_back_by_our_clients(
    temporal_env, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    ours: Client = temporal_env.client  # the data converter every process uses
    queue = f"failures-{uuid.uuid4()}"
    async with Worker(
        ours, task_queue=queue, workflows=[FailsWithValues], workflow_runner=UnsandboxedWorkflowRunner()
    ):
        handle = await ours.start_workflow(FailsWithValues.run, id=f"fails-{uuid.uuid4()}", task_queue=queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, ApplicationError)
    assert SECRET in failed.value.cause.message  # decoded by our converter: operations read it with the codec

    plain = await Client.connect(
        temporal_env.client.service_client.config.target_host, namespace=ours.namespace
    )
    history = await plain.get_workflow_handle(handle.id).fetch_history()
    [event] = [e for e in history.events if e.HasField("workflow_execution_failed_event_attributes")]
    failure = event.workflow_execution_failed_event_attributes.failure
    assert failure.message == "Encoded failure" and failure.stack_trace == ""
    assert SECRET.encode() not in history.to_json().encode()
