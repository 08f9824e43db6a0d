"""The case workflow `case-{case_id}`: one second opinion from request to delivered report.

Signal ``on_event(CloudEvent)``: an event from a service, delivered by the event bridge; an event id seen
before is dropped. Queries ``status`` and ``timeline``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from contracts.commands import (
        CollectRecords,
        Command,
        ComposeReport,
        DeliverReport,
        MatchSpecialist,
        VerifyInsurance,
    )
    from contracts.envelope import CloudEvent
    from contracts.events import (
        InsuranceVerified,
        RecordsAssembled,
        ReportDelivered,
        ReportReady,
        ReviewAssigned,
        ReviewSubmitted,
        ReviewUnmatched,
    )
    from contracts.models import CaseInput, CaseStatus
    from services.common.temporal import ASSIGNED_REVIEWER, CASE_STATUS, SUBSPECIALTY
    from workflows.activities import CaseActivities
    from workflows.models import CaseOutcome, PublishCommand, PublishStatus, TimelineItem

E = TypeVar("E", bound=BaseModel)

# Publishing is retried until the broker confirms: a case never loses a command to a broker restart.
PUBLISH_TIMEOUT = timedelta(seconds=30)
PUBLISH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# No specialist can take the case: try matching again after this wait.
REMATCH_AFTER = timedelta(hours=1)


@workflow.defn(name="CaseWorkflow")
class CaseWorkflow:
    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._events: dict[str, CloudEvent] = {}
        self._status = CaseStatus.INTAKE
        self._timeline: list[TimelineItem] = []

    @workflow.run
    async def run(self, case: CaseInput) -> CaseOutcome:
        await self._transition(CaseStatus.AWAITING_RECORDS, "records and insurance verification requested")
        await asyncio.gather(
            self._send(
                CollectRecords(
                    case_id=case.case_id, patient=case.patient, exam=case.exam, partner_id=case.partner_id
                )
            ),
            self._send(
                VerifyInsurance(
                    case_id=case.case_id, coverage=case.coverage, patient_state=case.patient.state
                )
            ),
        )
        records = await self._wait_for(RecordsAssembled)
        if InsuranceVerified.TYPE not in self._events:
            await self._transition(CaseStatus.AWAITING_INSURANCE, "records complete; waiting for insurance")
        insurance = await self._wait_for(InsuranceVerified)

        assigned = await self._match(case, records)
        review = await self._wait_for(ReviewSubmitted)
        await self._transition(CaseStatus.COMPOSING_REPORT, f"review submitted ({review.agreement})")
        await self._send(ComposeReport(case_id=case.case_id, review_id=review.review_id))

        report = await self._wait_for(ReportReady)
        await self._transition(CaseStatus.DELIVERING, "report ready; delivering to the referring physician")
        await self._send(
            DeliverReport(
                case_id=case.case_id,
                report_id=report.report_id,
                pdf_url=report.pdf_url,
                fhir_url=report.fhir_url,
            )
        )
        delivered = await self._wait_for(ReportDelivered)
        await self._transition(CaseStatus.DELIVERED, f"delivered to {delivered.recipient}")
        await self._transition(
            CaseStatus.CLOSED, f"closed; patient estimate {insurance.patient_cost} {insurance.currency}"
        )
        return CaseOutcome(
            case_id=case.case_id,
            status=self._status,
            reviewer_id=assigned.reviewer_id,
            report_id=report.report_id,
        )

    async def _match(self, case: CaseInput, records: RecordsAssembled) -> ReviewAssigned:
        while True:
            await self._transition(CaseStatus.MATCHING, f"matching a {case.subspecialty_hint} specialist")
            self._events.pop(ReviewUnmatched.TYPE, None)
            await self._send(
                MatchSpecialist(
                    case_id=case.case_id,
                    exam=case.exam,
                    patient=case.patient,
                    referring=case.referring,
                    urgency=case.urgency,
                    subspecialty_hint=case.subspecialty_hint,
                    clinical_question=case.clinical_question,
                    reason=case.reason,
                    due_at=case.due_at,
                    original_report=records.report,
                    study=records.study,
                )
            )
            await workflow.wait_condition(
                lambda: ReviewAssigned.TYPE in self._events or ReviewUnmatched.TYPE in self._events
            )
            if ReviewAssigned.TYPE in self._events:
                break
            unmatched = ReviewUnmatched.model_validate(self._events[ReviewUnmatched.TYPE].data)
            await self._transition(CaseStatus.UNMATCHED, f"no specialist available: {unmatched.reason}")
            await workflow.sleep(REMATCH_AFTER)
        assigned = ReviewAssigned.model_validate(self._events[ReviewAssigned.TYPE].data)
        workflow.upsert_search_attributes(
            [ASSIGNED_REVIEWER.value_set(assigned.reviewer_id), SUBSPECIALTY.value_set(assigned.subspecialty)]
        )
        await self._transition(
            CaseStatus.IN_REVIEW, f"assigned to {assigned.reviewer_id}: {assigned.explanation}"
        )
        return assigned

    @workflow.signal
    def on_event(self, event: CloudEvent) -> None:
        if event.id in self._seen:
            return
        self._seen.add(event.id)
        self._events[event.type] = event

    @workflow.query
    def status(self) -> CaseStatus:
        return self._status

    @workflow.query
    def timeline(self) -> list[TimelineItem]:
        return self._timeline

    async def _wait_for(self, event_type: type[E]) -> E:
        key: str = event_type.TYPE  # type: ignore[attr-defined]
        await workflow.wait_condition(lambda: key in self._events)
        return event_type.model_validate(self._events[key].data)

    async def _send(self, command: Command) -> None:
        await workflow.execute_activity_method(
            CaseActivities.publish_command,
            PublishCommand(case_id=command.case_id, type=command.TYPE, data=command.model_dump(mode="json")),
            start_to_close_timeout=PUBLISH_TIMEOUT,
            retry_policy=PUBLISH_RETRY,
        )

    async def _transition(self, status: CaseStatus, detail: str) -> None:
        previous, self._status = self._status, status
        now = workflow.now()
        self._timeline.append(TimelineItem(status=status, at=now, detail=detail))
        workflow.upsert_search_attributes([CASE_STATUS.value_set(status.value)])
        await workflow.execute_activity_method(
            CaseActivities.publish_status,
            PublishStatus(
                case_id=workflow.info().workflow_id.removeprefix("case-"),
                status=status,
                previous=previous,
                at=now,
                detail=detail,
            ),
            start_to_close_timeout=PUBLISH_TIMEOUT,
            retry_policy=PUBLISH_RETRY,
        )
