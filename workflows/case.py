"""The case workflow `case-{case_id}`: one second opinion from request to delivered report.

Signals: ``on_event(CloudEvent)`` (a service's event, from the event bridge; a seen event id is dropped),
``consent_received(ConsentReceived)``; one whose input does not fit, or of another name, is noted on the timeline.
Updates (validated: a decision that makes no sense in the current state is rejected before it is written, and so
is one whose input is not one JSON object that fits, naming the update and what it takes):
``cancel``, ``decide_cost``, ``reconcile_identity``, ``reassign_reviewer``, ``document_communication``,
``hold``, ``resume``, ``ask_question``, ``close``. The case completes once every decision has finished.
Queries: ``status``, ``timeline``, ``decisions``, ``alerts``, ``due_at``, ``review``, ``received`` (``timeline``,
``alerts`` and ``received`` return at most QUERY_ITEMS items: the first and the latest).

Temporal ends a history at 51,200 events (it warns from 10,240). The loops that run while nobody acts, measured
on the dev server with the default CasePolicy (README, "How long a case can wait"):

    loop                              one turn            how often                     warning      limit
    communication reminder            6 events, 1.2 KB    1 h x8, 4 h to day 7, daily   ~4.5 years   ~23 years
      (before communication-reminders-back-off: every hour, 71 days / 356 days; on hold a timer every hour)
    unmatched, matching again         12 events, 3.0 KB   1, 2, 4 h, then 6 h           ~7 months    ~2.9 years
      (before rematch-backs-off: every hour, 36 days / 178 days)
    authorization reminder            6 events, 1.2 KB    48 h                          ~9 years     ~47 years
    offer lapsed / declined           ~14 events, 3 KB    24 h                          bounded: each excludes one specialist
    records reminders, due date, follow-up questions: a fixed number of turns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from contracts.commands import (
        CloseReview,
        CollectRecords,
        Command,
        ComposeReport,
        DeliverReport,
        FollowUpQuestionForReviewer,
        MatchSpecialist,
        ReconcileIdentity,
        RemindRecords,
        VerifyInsurance,
        WithdrawOffer,
    )
    from contracts.decisions import (
        CancelCase,
        CloseCase,
        ConsentReceived,
        CostChoice,
        CostDecision,
        Decision,
        DocumentCommunication,
        FollowUpQuestion,
        HoldCase,
        IdentityDecision,
        ReassignReviewer,
        ResumeCase,
    )
    from contracts.envelope import CloudEvent
    from contracts.events import (
        EVENT_TYPES,
        CaseAlert,
        CaseCancelled,
        CaseStatusChanged,
        IdentityMismatch,
        InsuranceVerified,
        QuestionAnswered,
        RecordsAssembled,
        RecordsIncomplete,
        ReportAddended,
        ReportDelivered,
        ReportReady,
        ReviewAccepted,
        ReviewAssigned,
        ReviewDeclined,
        ReviewOffered,
        ReviewSubmitted,
        ReviewUnmatched,
    )
    from contracts.models import CaseInput, CaseStatus, DocumentedCommunication
    from contracts.triage import BUSINESS_DAYS_AFTER_RECORDS, add_business_days
    from contracts.validation import problems_of
    from services.common.temporal import ASSIGNED_REVIEWER, CASE_DUE_AT, CASE_STATUS, SUBSPECIALTY
    from workflows.activities import CaseActivities
    from workflows.models import (
        AlertRecord,
        CaseOutcome,
        DecisionRecord,
        Outgoing,
        PublishBatch,
        PublishCommand,
        PublishEvent,
        ReviewAssignment,
        TimelineItem,
    )

E = TypeVar("E", bound=BaseModel)
T = TypeVar("T")
D = TypeVar("D", bound=Decision)

# Publishing is retried until the broker confirms: a case never loses a command to a broker restart.
PUBLISH_TIMEOUT = timedelta(seconds=30)
PUBLISH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
LOCAL_PUBLISH = "publish-as-local-activity"  # workflow.patched id: cases from before publish with activities
BATCH_PUBLISH = "publish-step-at-once"  # workflow.patched id: cases from before publish one message at a time
ANSWERS_IN_TURN = "answers-in-turn"  # workflow.patched id: older cases look an answer up from its request
OFFER_WITHIN_DUE = "offer-within-due-date"  # workflow.patched id: an offer lapses within the time left
CRITICAL_ALERT = "critical-result-alert"  # workflow.patched id: a critical result alerts operations at once
OWN_ADDENDA = "deliver-own-addenda"  # workflow.patched id: a specialist's own addendum is delivered too
# workflow.patched id: a critical result or major discrepancy submitted without a documented communication waits
# for operations to document one before the report is composed (cases from before compose it at once).
COMMUNICATION_FIRST = "communication-before-report"
CANCEL_ENDS_HOLD = (
    "cancel-ends-hold"  # workflow.patched id: a case cancelled on hold ends cancelled, not on_hold
)
# workflow.patched id: the case completes once its running decisions have finished (a resume announcing the status
# it resumes in); cases from before completed at once, failing that update and leaving the SDK's warning.
HANDLERS_FINISH_FIRST = "decisions-finish-before-the-case-ends"
# The documenter's clock may run a few minutes ahead of the workflow's: a communication that far ahead is accepted.
CLOCK_SKEW = timedelta(minutes=5)
# While a report waits for the communication to be documented, operations is reminded this often (not on hold).
# A constant, not a CasePolicy field: a worker from before would refuse a case input carrying a new field.
COMMUNICATION_REMINDER = timedelta(hours=1)
# workflow.patched id: the communication reminders back off (hourly for 8 hours, every 4 hours to the 7th day, then
# daily) and a hold waits without a timer; cases from before remind every hour (6 history events each: ~71 days to
# Temporal's 10,240-event warning). Decided when the wait starts.
COMMUNICATION_BACKOFF = "communication-reminders-back-off"
# workflow.patched id: while no specialist is available the wait before matching again doubles from the policy's
# rematch_after_hours up to REMATCH_CAP (reset by an offer); cases from before match again every
# rematch_after_hours (~12 history events each: ~35 days to the warning at 1 hour).
REMATCH_BACKOFF = "rematch-backs-off"
REMATCH_CAP = timedelta(hours=6)
# workflow.patched id, asked first thing in a case's first workflow task: a case started with it takes every change
# above as made and asks no patch mid-run. A patch asked mid-run could be answered wrongly on replay: under load a
# publish (local activity) had its marker recorded by one task and its result reach the workflow in the next, so
# live the workflow asked the patch (right after the result) in the next task, while a replay hands it the result
# in the first and asks there, before the SDK has seen the marker. The patch then read False and the replay failed
# (TMPRL1100, "Non-deprecated patch marker encountered") on every query of the closed case or worker restart.
PATCHES_AT_START = "patches-decided-at-start"
# The patches a case asks first thing, in this order, and keeps all its life. A later change adds its id here: cases
# started before it keep the old path to the end (none takes a new path midway), and none asks a patch mid-run.
ASKED_AT_START: tuple[str, ...] = (PATCHES_AT_START,)
# The changes before PATCHES_AT_START: a case started with it takes them all; one from before asks each mid-run.
EARLIER_PATCHES = (
    LOCAL_PUBLISH,
    BATCH_PUBLISH,
    ANSWERS_IN_TURN,
    OFFER_WITHIN_DUE,
    CRITICAL_ALERT,
    OWN_ADDENDA,
    COMMUNICATION_FIRST,
    CANCEL_ENDS_HOLD,
    HANDLERS_FINISH_FIRST,
    COMMUNICATION_BACKOFF,
    REMATCH_BACKOFF,
)

# A query returns at most this many items of the timeline, alerts or received events: the first QUERY_HEAD (how the
# case began) and the latest, with one item saying how many were left out between. A list the case keeps growing
# (a reminder a day, a rematch every 6 hours, a signal noted) stays far below Temporal's query size limit.
QUERY_ITEMS = 500
QUERY_HEAD = 100

# A decision's texts that may not be left blank where its model requires them, and what to put there.
REQUIRED_TEXTS = {
    "by": "give the id of the staff member, partner or specialist who decided",
    "reason": "say why, in a few words; it goes on the case's audit",
    "text": "write out the question for the specialist",
}

WAITING_STATES = {
    CaseStatus.AWAITING_CONSENT: "a records-release authorization (Consent or signed form) from the partner",
    CaseStatus.AWAITING_RECORDS: "the original report and ultrasound images from the referring facility",
    CaseStatus.IDENTITY_MISMATCH: "an operator to reconcile the patient identity of an import",
    CaseStatus.AWAITING_INSURANCE: "insurance verification (or the referral / prior authorization)",
    CaseStatus.AWAITING_PATIENT_DECISION: "the patient's decision on the estimated cost",
    CaseStatus.MATCHING: "a subspecialist match",
    CaseStatus.UNMATCHED: "a specialist to become available",
    CaseStatus.AWAITING_ACCEPTANCE: "the specialist to accept the offer",
    CaseStatus.IN_REVIEW: "the specialist's second opinion",
    CaseStatus.AWAITING_COMMUNICATION: (
        "operations to document that the referring physician was told directly of the critical result or major "
        "discrepancy: who, their role, how (telephone, in person) and when (update `document_communication`); "
        "the report is composed after it and states it"
    ),
    CaseStatus.COMPOSING_REPORT: "the integrated report",
    CaseStatus.DELIVERING: "delivery to the referring physician",
    CaseStatus.FOLLOW_UP: "follow-up questions from the referring physician or the patient",
    CaseStatus.ON_HOLD: "an operator to resume the case",
}


def communication_reminder_interval(sent: int) -> timedelta:
    """The wait before the next communication reminder, `sent` reminders in: hourly for 8 hours (a shift), every 4
    hours to the end of the 7th day, then daily (about 406 reminders a year, not 8,760)."""
    if sent < 8:
        return COMMUNICATION_REMINDER
    if sent < 48:
        return timedelta(hours=4)
    return timedelta(days=1)


def rematch_interval(every: timedelta, unmatched: int) -> timedelta:
    """The wait before matching again after the `unmatched`-th answer in a row that no specialist is available:
    `every` doubled each time, at most REMATCH_CAP (or `every`, if a policy sets it longer)."""
    return min(every * 2 ** min(max(unmatched - 1, 0), 16), max(every, REMATCH_CAP))


def _first_and_latest(items: list[T], gap: Callable[[int, T], T]) -> list[T]:
    """`items`, or if more than QUERY_ITEMS the first QUERY_HEAD, `gap(left_out, first left out)`, the latest."""
    if len(items) <= QUERY_ITEMS:
        return items
    latest = QUERY_ITEMS - QUERY_HEAD - 1
    left_out = len(items) - QUERY_HEAD - latest
    return [*items[:QUERY_HEAD], gap(left_out, items[QUERY_HEAD]), *items[-latest:]]


def _left_out(count: int) -> str:
    return (
        f"{count} items left out here (a query shows the first {QUERY_HEAD} and the latest "
        f"{QUERY_ITEMS - QUERY_HEAD - 1}); the case's history in the Temporal UI holds them all"
    )


class Rematch(Exception):
    """The current offer or review ended (declined, lapsed, reassigned): match again."""


def _utc(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _review_documents_communication(submitted: ReviewSubmitted) -> bool:
    """Whether the specialist documented who was told. A review service from before it said so: a critical result
    could not be submitted without one, a major discrepancy could."""
    return submitted.communicated if submitted.communicated is not None else submitted.critical


def _decision(update: str, model: type[D], received: tuple[Any, ...]) -> D:
    """The one input of update `update` as `model`, or a refusal (raised from its validator, before the update is
    accepted) naming the update and the input it takes. Updates take their input undecoded, as the signals do:
    typed, one sent without input (the `temporal` CLI without --input) or with two reached the validator as the
    SDK's TypeError about a missing or extra Python argument, and a null one as None; accepted, that handler
    would fail the workflow task on every retry. A field that does not fit is said by field and rule, never by
    value (it may be PHI). A required text of only spaces is refused too (the length rules count them): the
    audit names who decided and why, the partner is told why a case was cancelled, the specialist gets the
    question."""
    fields = ", ".join(model.model_fields)
    if len(received) != 1 or received[0] is None:
        if not received:
            problem = "it came with none (with the temporal CLI: --input '{...}')"
        elif len(received) == 1:
            problem = "not null"
        else:
            problem = f"not {len(received)} inputs"
        raise ValueError(
            f"update {update} needs its input as one JSON object ({fields}), {problem}; nothing was changed"
        )
    try:
        decision = model.model_validate(received[0])
    except ValidationError as invalid:
        raise ValueError(
            f"update {update}: {problems_of(invalid)}; send one JSON object ({fields}); nothing was changed"
        ) from None
    for name, what in REQUIRED_TEXTS.items():
        field = model.model_fields.get(name)
        if field is not None and field.is_required() and not getattr(decision, name).strip():
            raise ValueError(f"update {update}: `{name}` is blank; {what}")
    return decision


@workflow.defn(name="CaseWorkflow")
class CaseWorkflow:
    def __init__(self) -> None:
        self._case: CaseInput | None = None
        self._seen: set[str] = set()
        self._received: list[CloudEvent] = []
        # turn ("match", "delivery", "question") -> position after the last answer taken on it
        self._answered: dict[str, int] = {}
        self._status = CaseStatus.INTAKE
        self._status_since: datetime | None = None
        self._status_changes = 0  # the status changes announced so far: the `seq` of the last one
        self._timeline: list[TimelineItem] = []
        self._decisions: list[DecisionRecord] = []
        self._alerts: list[AlertRecord] = []
        self._due_at: datetime | None = None
        self._due_version = 0
        self._started_at: datetime | None = None
        self._consent = False
        self._cancel: CancelCase | None = None
        self._hold: HoldCase | None = None
        self._status_before_hold: CaseStatus | None = None
        self._cost: CostDecision | None = None
        self._identity: dict[str, IdentityDecision] = {}
        self._reassign: ReassignReviewer | None = None
        self._questions: list[FollowUpQuestion] = []
        self._close: CloseCase | None = None
        self._review_submitted = False
        self._delivered_at: datetime | None = None
        self._offer: ReviewOffered | None = None
        self._withdrawn: WithdrawOffer | None = None  # the offer just withdrawn: the next match carries it
        self._reviewer: str | None = None
        self._reminders_sent = 0
        self._own_addenda = False  # the specialist's own addenda are delivered (patch OWN_ADDENDA)
        self._own_delivered = 0  # how many of them were
        self._communication_awaited = False  # document_communication asked for (patch COMMUNICATION_FIRST)
        self._communication: DocumentedCommunication | None = None
        self._unmatched_in_a_row = 0  # no specialist available, answered this often since the last offer
        self._at_start: dict[str, bool] | None = None  # ASKED_AT_START: whether this case runs with each

    def _ask_patches(self) -> dict[str, bool]:
        """Asked in the case's first workflow task (by `run`, or a handler of that task if one asks first)."""
        if self._at_start is None:
            self._at_start = {patch_id: workflow.patched(patch_id) for patch_id in ASKED_AT_START}
        return self._at_start

    def _patched(self, patch_id: str) -> bool:
        """Whether this case runs with the change `patch_id`: as it decided at its start; for a change before
        PATCHES_AT_START, a case from before asks `workflow.patched` where it always has (its marker is there)."""
        at_start = self._ask_patches()
        if patch_id in at_start:
            return at_start[patch_id]
        assert patch_id in EARLIER_PATCHES, f"{patch_id} is neither in ASKED_AT_START nor in EARLIER_PATCHES"
        return at_start[PATCHES_AT_START] or workflow.patched(patch_id)

    # ---- the business process ------------------------------------------------------------------

    @workflow.run
    async def run(self, case: CaseInput) -> CaseOutcome:
        self._ask_patches()  # before anything else can wait
        self._case = case
        self._due_at = case.due_at
        self._started_at = workflow.now()
        self._consent = case.consent_on_file
        watcher = asyncio.create_task(self._watch_due_date())
        process = asyncio.create_task(self._process(case))
        await workflow.wait_condition(lambda: process.done() or self._cancel is not None)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not process.done():
            process.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await process
            outcome = await self._compensate(case)
        else:
            outcome = process.result()
        if self._patched(HANDLERS_FINISH_FIRST):
            # A decision still publishing (a resume that releases the closing step announces the status it
            # resumes in) gets its answer to its caller and its message out before the case completes.
            await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome

    async def _process(self, case: CaseInput) -> CaseOutcome:
        if not self._consent:
            await self._transition(CaseStatus.AWAITING_CONSENT, "no records-release authorization on file")
            await workflow.wait_condition(lambda: self._consent)
        await self._transition(
            CaseStatus.AWAITING_RECORDS,
            "records and insurance verification requested",
            then=[
                CollectRecords(
                    case_id=case.case_id, patient=case.patient, exam=case.exam, partner_id=case.partner_id
                ),
                VerifyInsurance(
                    case_id=case.case_id,
                    coverage=case.coverage,
                    patient_state=case.patient.state,
                    partner_id=case.partner_id,
                    patient=case.patient,
                ),
            ],
        )
        records = await self._collect_records(case)
        insurance = await self._verify_insurance()
        await self._patient_decision(insurance)

        submitted = await self._review(case, records)
        communication = await self._communicated(submitted)
        await self._transition(
            CaseStatus.COMPOSING_REPORT,
            f"review submitted ({submitted.agreement})"
            + (f"; communication documented by {communication.documented_by}" if communication else ""),
            # This code delivers own addenda (patch OWN_ADDENDA, decided later in follow-up, is always taken by a
            # case that composes with it); a case composed by older code says nothing, and the review refuses them.
            then=[
                ComposeReport(
                    case_id=case.case_id,
                    review_id=submitted.review_id,
                    own_addenda_delivered=True,
                    communication=communication,
                )
            ],
        )
        report = await self._wait_for(ReportReady)
        await self._deliver(case, report.report_id, report.pdf_url, report.fhir_url)
        await self._follow_up(case, report)
        closed_by = f"by {self._close.by}: no further questions" if self._close else "follow-up window ended"
        # The review takes no addendum once nothing more would be delivered (cases from before: no command).
        closing = (
            [CloseReview(case_id=case.case_id, reason=closed_by, own_addenda_delivered=self._own_delivered)]
            if self._own_addenda
            else []
        )
        await self._transition(CaseStatus.CLOSED, f"closed {closed_by}", then=closing)
        return CaseOutcome(
            case_id=case.case_id, status=self._status, reviewer_id=self._reviewer, report_id=report.report_id
        )

    async def _collect_records(self, case: CaseInput) -> RecordsAssembled:
        """Wait for complete records, reminding the facility and escalating on the policy's clock."""
        requested_at = workflow.now()
        reminders = [timedelta(hours=h) for h in case.policy.records_reminder_hours]
        escalation = timedelta(hours=case.policy.records_escalation_hours)
        escalated = False
        while not self._has(RecordsAssembled):
            mismatch = self._pending_mismatch()
            if mismatch is not None:
                await self._resolve_mismatch(case, mismatch)
                continue
            elapsed = workflow.now() - requested_at
            next_reminder = reminders[self._reminders_sent] if self._reminders_sent < len(reminders) else None
            deadlines = [d for d in (next_reminder, None if escalated else escalation) if d is not None]
            timeout = min(deadlines) - elapsed if deadlines else None
            reminding = next_reminder is not None and (escalated or next_reminder <= escalation)
            fired = await self._wait_or_timeout(
                lambda: self._has(RecordsAssembled) or self._pending_mismatch() is not None,
                timeout,
                f"records reminder {self._reminders_sent + 1} to the facility"
                if reminding
                else "records escalation to operations",
            )
            if fired:
                continue
            elapsed = workflow.now() - requested_at
            if next_reminder is not None and elapsed >= next_reminder:
                self._reminders_sent += 1
                await self._send(RemindRecords(case_id=case.case_id, attempt=self._reminders_sent))
                self._note(f"records reminder {self._reminders_sent} sent to the referring facility")
            if not escalated and elapsed >= escalation:
                escalated = True
                await self._alert(
                    "records_escalated", f"records still incomplete after {escalation}; operations"
                )
        records = self._latest(RecordsAssembled)
        await self._move_due_date_after_records(case)
        return records

    def _pending_mismatch(self) -> IdentityMismatch | None:
        for event in self._received:
            if event.type == IdentityMismatch.TYPE:
                mismatch = IdentityMismatch.model_validate(event.data)
                if mismatch.import_id not in self._identity:
                    return mismatch
        return None

    async def _resolve_mismatch(self, case: CaseInput, mismatch: IdentityMismatch) -> None:
        previous = self._status
        await self._transition(
            CaseStatus.IDENTITY_MISMATCH,
            f"import {mismatch.import_id} differs in {', '.join(mismatch.differences)}; nothing of it is released",
        )
        await workflow.wait_condition(lambda: mismatch.import_id in self._identity)
        decision = self._identity[mismatch.import_id]
        await self._send(
            ReconcileIdentity(
                case_id=case.case_id,
                import_id=mismatch.import_id,
                decision=decision.choice.value,
                decided_by=decision.by,
                reason=decision.reason,
            )
        )
        await self._transition(
            previous, f"import {mismatch.import_id} {decision.choice.value}ed by {decision.by}"
        )

    async def _move_due_date_after_records(self, case: CaseInput) -> None:
        days = BUSINESS_DAYS_AFTER_RECORDS.get(case.urgency.value)
        if days is None or self._due_at is None:
            return
        candidate = add_business_days(workflow.now(), days)
        if candidate > self._due_at:
            old = self._due_at
            self._set_due_at(candidate)
            await self._alert(
                "due_date_moved",
                f"records completed {workflow.now():%Y-%m-%d %H:%M} UTC; due date moved from "
                f"{old:%Y-%m-%d %H:%M} to {candidate:%Y-%m-%d %H:%M} UTC ({days} business days)",
            )

    async def _verify_insurance(self) -> InsuranceVerified:
        while True:
            if not self._has(InsuranceVerified):
                await self._transition(
                    CaseStatus.AWAITING_INSURANCE, "records complete; waiting for insurance"
                )
                await workflow.wait_condition(lambda: self._has(InsuranceVerified))
            insurance = self._latest(InsuranceVerified)
            if insurance.authorization != "auth-needed":
                return insurance
            await self._transition(
                CaseStatus.AWAITING_INSURANCE,
                "the plan needs a referral or prior authorization before the review",
            )
            await self._await_authorization()

    async def _await_authorization(self) -> None:
        """Wait for the referral or authorization number, reminding the partner on the policy's clock."""
        assert self._case is not None
        every = timedelta(hours=self._case.policy.authorization_reminder_hours)
        reminders = 0
        while not await self._wait_or_timeout(
            lambda: self._latest(InsuranceVerified).authorization != "auth-needed",
            every,
            f"authorization reminder {reminders + 1}",
        ):
            reminders += 1
            await self._alert(
                "authorization_reminder",
                f"reminder {reminders}: the plan needs a referral or prior authorization number "
                f"(POST /v1/coverage/{self._case.case_id}/authorization)",
            )

    async def _patient_decision(self, insurance: InsuranceVerified) -> None:
        if insurance.patient_cost <= 0:
            return
        await self._transition(
            CaseStatus.AWAITING_PATIENT_DECISION,
            f"estimated patient cost {insurance.patient_cost} {insurance.currency} ({insurance.coverage_status})",
        )
        await workflow.wait_condition(lambda: self._cost is not None)
        assert self._cost is not None
        if self._cost.choice == CostChoice.DECLINE:
            self._cancel = CancelCase(
                by=self._cost.by, reason=f"patient declined the estimated cost. {self._cost.reason}"
            )
            await workflow.wait_condition(lambda: False)  # the run loop cancels this task

    async def _review(self, case: CaseInput, records: RecordsAssembled) -> ReviewSubmitted:
        excluded: list[str] = []
        while True:
            preferred = self._reassign.reviewer_id if self._reassign else None
            self._reassign = None
            try:
                return await self._offer_and_review(case, records, excluded, preferred)
            except Rematch as ended:
                if self._offer is not None:
                    excluded.append(self._offer.reviewer_id)
                self._note(str(ended))
                self._offer = None
                self._reviewer = None

    async def _offer_and_review(
        self, case: CaseInput, records: RecordsAssembled, excluded: list[str], preferred: str | None
    ) -> ReviewSubmitted:
        mark = await self._transition(
            CaseStatus.MATCHING,
            f"matching a {case.subspecialty_hint} specialist",
            then=[
                MatchSpecialist(
                    case_id=case.case_id,
                    exam=case.exam,
                    patient=case.patient,
                    referring=case.referring,
                    urgency=case.urgency,
                    subspecialty_hint=case.subspecialty_hint,
                    clinical_question=case.clinical_question,
                    reason=case.reason,
                    due_at=self._due_at or case.due_at,
                    original_report=records.report,
                    study=records.study,
                    exclude_reviewers=list(excluded),
                    preferred_reviewer=preferred,
                    plan_code=case.coverage.plan_code,
                    adequacy_warnings=records.warnings,
                    partner_id=case.partner_id,
                    partner_case_ref=case.partner_case_ref,
                    partner_case_ref_system=case.partner_case_ref_system,
                    procedure_scheduled_on=case.procedure_scheduled_on,
                    gestational_age_weeks=case.gestational_age_weeks,
                    withdraw=self._withdrawn,
                )
            ],
        )
        self._withdrawn = None
        answer, mark = await self._answer(
            "match", mark, ReviewOffered.TYPE, ReviewAssigned.TYPE, ReviewUnmatched.TYPE
        )
        if answer.type == ReviewUnmatched.TYPE:
            unmatched = ReviewUnmatched.model_validate(answer.data)
            self._unmatched_in_a_row += 1
            every = timedelta(hours=case.policy.rematch_after_hours)
            if self._patched(REMATCH_BACKOFF):
                every = rematch_interval(every, self._unmatched_in_a_row)
            await self._transition(CaseStatus.UNMATCHED, f"no specialist available: {unmatched.reason}")
            await self._wait_or_timeout(
                lambda: self._reassign is not None, every, "match again (no specialist was available)"
            )
            raise Rematch(
                f"matching again after no specialist was available ({self._unmatched_in_a_row} in a row)"
            )
        self._unmatched_in_a_row = 0
        if answer.type == ReviewAssigned.TYPE:  # a directory that assigns without an offer
            assigned = ReviewAssigned.model_validate(answer.data)
            self._offer = ReviewOffered(**assigned.model_dump())
        else:
            self._offer = ReviewOffered.model_validate(answer.data)
            await self._await_acceptance(case, self._offer, mark)
        offer = self._offer
        self._reviewer = offer.reviewer_id
        workflow.upsert_search_attributes(
            [ASSIGNED_REVIEWER.value_set(offer.reviewer_id), SUBSPECIALTY.value_set(offer.subspecialty)]
        )
        await self._transition(CaseStatus.IN_REVIEW, f"{offer.reviewer_id} reviewing: {offer.explanation}")
        await workflow.wait_condition(
            lambda: (
                self._find(mark, ReviewSubmitted.TYPE, offer.review_id) is not None
                or self._reassign is not None
            )
        )
        submitted = self._find(mark, ReviewSubmitted.TYPE, offer.review_id)
        if submitted is None:
            await self._withdraw(case, offer, "reassigned")
            workflow.upsert_search_attributes([ASSIGNED_REVIEWER.value_unset()])
            raise Rematch(f"review by {offer.reviewer_id} withdrawn: reassigned")
        self._review_submitted = True
        return ReviewSubmitted.model_validate(submitted.data)

    async def _communicated(self, submitted: ReviewSubmitted) -> DocumentedCommunication | None:
        """Alert operations of a critical result or major discrepancy. One submitted without a documented
        communication waits here until operations documents who was told, how and when; that goes on the report.
        Returns it, or None when the review documents its own or none is due."""
        significant = submitted.critical or submitted.agreement == "major_discrepancy"
        told = _review_documents_communication(submitted)
        # Asked for from here on: operations may document it as soon as the alert reaches them.
        self._communication_awaited = significant and not told and self._patched(COMMUNICATION_FIRST)
        if significant and self._patched(CRITICAL_ALERT):
            kind = "critical result" if submitted.critical else "major discrepancy"
            if self._communication_awaited:
                detail = (
                    f"{kind} submitted without a documented communication; the report waits until operations "
                    "documents that the referring physician was told directly (update document_communication: "
                    "who, role, how, when)"
                )
            elif told:
                detail = (
                    f"{kind}; the specialist documented that the referring physician was told (on the report)"
                )
            else:  # cases from before COMMUNICATION_FIRST
                detail = f"{kind}; confirm the referring physician was reached before the report is delivered"
            await self._alert("critical_result", f"{submitted.reviewer_id}: {detail}")
        if not self._communication_awaited:
            return None
        if self._communication is None:
            await self._transition(
                CaseStatus.AWAITING_COMMUNICATION,
                f"review submitted ({submitted.agreement}) without a documented communication; the report waits "
                "until operations documents that the referring physician was told",
            )
            waiting_since, reminders = workflow.now(), 0
            backs_off = self._patched(COMMUNICATION_BACKOFF)
            while True:
                if backs_off and self._hold is not None:
                    # On hold by operations' choice: no timer, no reminder until it is resumed.
                    await workflow.wait_condition(
                        lambda: self._communication is not None or self._hold is None
                    )
                    if self._communication is not None:
                        break
                every = communication_reminder_interval(reminders) if backs_off else COMMUNICATION_REMINDER
                if await self._wait_or_timeout(
                    lambda: self._communication is not None, every, f"communication reminder {reminders + 1}"
                ):
                    break
                if self._hold is not None:
                    continue  # on hold by operations' choice: no reminder until it is resumed
                reminders += 1
                await self._alert(
                    "communication_reminder",
                    f"reminder {reminders}: the report has waited since {_utc(waiting_since)} for operations to "
                    "document that the referring physician was told directly (update document_communication: "
                    "who, role, how, when)",
                )
        return self._communication

    async def _await_acceptance(self, case: CaseInput, offer: ReviewOffered, mark: int) -> None:
        """Answers are looked up from `mark` (where the match's answer was) on: one may arrive at any moment."""
        expires = workflow.now() + timedelta(hours=case.policy.offer_timeout_hours)
        if self._patched(OFFER_WITHIN_DUE):
            # One unanswered offer may take at most a quarter of the time left (an urgent case has 24 h).
            left = (self._due_at or case.due_at) - workflow.now()
            expires = min(expires, workflow.now() + max(left / 4, timedelta(minutes=30)))
        await self._transition(
            CaseStatus.AWAITING_ACCEPTANCE,
            f"offered to {offer.reviewer_id} until {expires:%Y-%m-%d %H:%M} UTC",
        )

        def answered() -> bool:
            return (
                self._find(mark, ReviewAccepted.TYPE, offer.review_id) is not None
                or self._find(mark, ReviewDeclined.TYPE, offer.review_id) is not None
                or self._reassign is not None
            )

        if not await self._wait_or_timeout(
            answered, expires - workflow.now(), f"offer to {offer.reviewer_id} lapses"
        ):
            await self._withdraw(case, offer, "expired")
            raise Rematch(f"offer to {offer.reviewer_id} lapsed at {expires:%Y-%m-%d %H:%M} UTC")
        declined = self._find(mark, ReviewDeclined.TYPE, offer.review_id)
        if declined is not None:
            raise Rematch(
                f"{offer.reviewer_id} declined: {ReviewDeclined.model_validate(declined.data).reason}"
            )
        if self._find(mark, ReviewAccepted.TYPE, offer.review_id) is None:
            await self._withdraw(case, offer, "reassigned")
            raise Rematch(f"offer to {offer.reviewer_id} withdrawn: reassigned")

    async def _withdraw(self, case: CaseInput, offer: ReviewOffered, reason: str) -> None:
        withdrawal = WithdrawOffer(case_id=case.case_id, review_id=offer.review_id, reason=reason)
        await self._send(withdrawal)
        # Another review replica may take the next match before this withdrawal: the match carries it too. A field
        # of the message, no new command: nothing to patch.
        self._withdrawn = withdrawal

    async def _deliver(self, case: CaseInput, report_id: str, pdf_url: str, fhir_url: str) -> None:
        mark = await self._transition(
            CaseStatus.DELIVERING,
            "report ready; delivering to the referring physician",
            then=[
                DeliverReport(case_id=case.case_id, report_id=report_id, pdf_url=pdf_url, fhir_url=fhir_url)
            ],
        )
        delivered, _ = await self._answer("delivery", mark, ReportDelivered.TYPE)
        self._delivered_at = self._delivered_at or workflow.now()
        await self._transition(
            CaseStatus.DELIVERED, f"delivered to {ReportDelivered.model_validate(delivered.data).recipient}"
        )

    async def _follow_up(self, case: CaseInput, report: ReportReady) -> None:
        window = timedelta(days=case.policy.follow_up_window_days)
        assert self._delivered_at is not None
        closes = self._delivered_at + window
        await self._transition(
            CaseStatus.FOLLOW_UP, f"follow-up questions accepted until {closes:%Y-%m-%d} UTC"
        )
        # Cases from before never woke for report.addended: a wait they left on a question or the close must
        # not end early on replay (its timer would be cancelled where the history has none cancelled).
        own_addenda = self._own_addenda = self._patched(OWN_ADDENDA)
        answered = 0
        own_delivered = 0
        while True:
            if answered < len(self._questions):
                question = self._questions[answered]
                mark = len(self._received)
                await self._send(
                    FollowUpQuestionForReviewer(
                        case_id=case.case_id,
                        question_id=question.question_id,
                        text=question.text,
                        asked_by=question.by,
                        review_id=self._offer.review_id if self._offer else None,
                    )
                )
                answer, _ = await self._answer(
                    "question", mark, QuestionAnswered.TYPE, key=question.question_id, key_field="question_id"
                )
                reply = QuestionAnswered.model_validate(answer.data)
                answered += 1
                await self._deliver(case, reply.report_id, report.pdf_url, report.fhir_url)
                await self._transition(CaseStatus.FOLLOW_UP, f"addendum {answered} delivered")
                continue
            own = self._own_addendum(own_delivered) if own_addenda else None
            if own is not None:
                own_delivered += 1
                self._own_delivered = own_delivered
                await self._deliver(case, own.report_id, report.pdf_url, report.fhir_url)
                await self._transition(
                    CaseStatus.FOLLOW_UP,
                    f"the specialist's own addendum delivered (report version {own.version})",
                )
                continue
            if self._close is not None:
                return
            waiting = await self._wait_or_timeout(
                lambda n=answered, m=own_delivered: (  # type: ignore[misc]
                    n < len(self._questions)
                    or self._close is not None
                    or (own_addenda and self._own_addendum(m) is not None)
                ),
                closes - workflow.now(),
                "the follow-up window closes",
            )
            if not waiting:
                return

    def _own_addendum(self, delivered: int) -> ReportAddended | None:
        """The specialist's own addendum after the first `delivered` ones, if it arrived (in the order signed)."""
        pending = [e for e in self._received if e.type == ReportAddended.TYPE]
        return ReportAddended.model_validate(pending[delivered].data) if len(pending) > delivered else None

    async def _compensate(self, case: CaseInput) -> CaseOutcome:
        """Cancellation: every service withdraws its work for the case; the partner is told via intake."""
        assert self._cancel is not None
        cancelled = CaseCancelled(
            case_id=case.case_id, reason=self._cancel.reason, cancelled_by=self._cancel.by
        )
        await self._publish(CaseCancelled.TYPE, cancelled)
        if self._hold is not None and self._patched(CANCEL_ENDS_HOLD):
            # Cancelling overrides operations' own hold; cases from before ended with status on_hold.
            self._hold = None
            self._status_before_hold = None
        await self._transition(CaseStatus.CANCELLED, f"cancelled by {self._cancel.by}: {self._cancel.reason}")
        return CaseOutcome(
            case_id=case.case_id, status=self._status, reviewer_id=self._reviewer, report_id=None
        )

    async def _watch_due_date(self) -> None:
        """An at-risk alert at the policy's fraction of the time to CaseDueAt, a breach at CaseDueAt; both recorded."""
        assert self._case is not None and self._started_at is not None
        at_risk = breached = False
        while not self._review_submitted and not breached:
            version = self._due_version
            assert self._due_at is not None
            span = self._due_at - self._started_at
            target = self._due_at if at_risk else self._started_at + span * self._case.policy.at_risk_fraction
            if await self._wait_or_timeout(
                lambda v=version: self._review_submitted or self._due_version != v,  # type: ignore[misc]
                target - workflow.now(),
                "breached alert (the due date)" if at_risk else "at_risk alert",
            ):
                continue
            if not at_risk:
                at_risk = True
                await self._alert(
                    "at_risk",
                    f"{self._case.policy.at_risk_fraction:.0%} of the time to the due date "
                    f"has passed without a submitted review (status {self._status})",
                )
            else:
                breached = True
                await self._alert(
                    "breached", f"due date {self._due_at:%Y-%m-%d %H:%M} UTC passed in status {self._status}"
                )

    # ---- signals, updates, queries ---------------------------------------------------------------

    # Signals are written to the history before the workflow sees them, and nothing validates them first: each
    # takes its input undecoded and checks it here. A typed parameter would have the SDK drop an input that does
    # not fit without a trace, and a signal without input (or with two) would fail the workflow task for ever.
    @workflow.signal
    def on_event(self, *received: Any) -> None:
        event = self._signal_input("on_event", CloudEvent, received)
        if event is None:
            return
        if event.id in self._seen:
            return
        problem = self._event_problem(event)
        if problem is not None:
            self._note(f"event {event.type} {event.id} ignored: {problem}; nothing was applied")
            return
        self._seen.add(event.id)
        self._received.append(event)
        if event.type == RecordsIncomplete.TYPE and self._case is not None:
            self._show_details()

    @workflow.signal
    def consent_received(self, *received: Any) -> None:
        consent = self._signal_input("consent_received", ConsentReceived, received)
        if consent is not None and not self._consent:
            self._consent = True
            self._audit("consent_received", consent, f"document {consent.document_id}")

    @workflow.signal(dynamic=True)
    def unknown_signal(self, name: str, received: Sequence[RawValue]) -> None:
        """A mistyped signal name would otherwise wait unseen in the SDK's buffer, with the CLI reporting success."""
        self._note(f"signal {name} ignored: this case takes the signals on_event, consent_received")

    @workflow.update
    def cancel(self, *received: Any) -> str:
        request = _decision("cancel", CancelCase, received)
        self._cancel = request
        self._audit("cancel", request)
        return f"case cancelled by {request.by}"

    @cancel.validator
    def _validate_cancel(self, *received: Any) -> None:
        _decision("cancel", CancelCase, received)
        self._require_open("cancel")
        if self._standing() in (CaseStatus.DELIVERING, CaseStatus.DELIVERED, CaseStatus.FOLLOW_UP):
            raise ValueError(f"the report is already {self._where()}; a delivered case cannot be cancelled")

    @workflow.update
    def decide_cost(self, *received: Any) -> str:
        decision = _decision("decide_cost", CostDecision, received)
        self._cost = decision
        self._audit("decide_cost", decision, decision.choice.value)
        return f"cost decision recorded: {decision.choice.value}"

    @decide_cost.validator
    def _validate_decide_cost(self, *received: Any) -> None:
        _decision("decide_cost", CostDecision, received)
        self._require_open("decide on the cost")
        if self._standing() != CaseStatus.AWAITING_PATIENT_DECISION or self._cost is not None:
            raise ValueError(f"no cost decision is pending (status {self._where()})")

    @workflow.update
    def reconcile_identity(self, *received: Any) -> str:
        decision = _decision("reconcile_identity", IdentityDecision, received)
        self._identity[decision.import_id] = decision
        self._audit("reconcile_identity", decision, f"{decision.choice.value} import {decision.import_id}")
        return f"import {decision.import_id}: {decision.choice.value}"

    @reconcile_identity.validator
    def _validate_reconcile_identity(self, *received: Any) -> None:
        decision = _decision("reconcile_identity", IdentityDecision, received)
        self._require_open("reconcile an identity")
        pending = self._pending_mismatch()
        if pending is None or pending.import_id != decision.import_id:
            raise ValueError(f"import {decision.import_id} is not waiting for an identity decision")

    @workflow.update
    def reassign_reviewer(self, *received: Any) -> str:
        request = _decision("reassign_reviewer", ReassignReviewer, received)
        self._reassign = request
        self._audit("reassign_reviewer", request, f"to {request.reviewer_id or 'next best match'}")
        return "the current reviewer will be withdrawn and the case matched again"

    @reassign_reviewer.validator
    def _validate_reassign(self, *received: Any) -> None:
        request = _decision("reassign_reviewer", ReassignReviewer, received)
        self._require_open("reassign")
        allowed = (CaseStatus.AWAITING_ACCEPTANCE, CaseStatus.IN_REVIEW, CaseStatus.UNMATCHED)
        if self._standing() not in allowed:
            raise ValueError(
                f"a reviewer can be reassigned only while {', '.join(allowed)} (now {self._where()})"
            )
        if self._reassign is not None:
            raise ValueError("a reassignment is already under way")
        if self._offer is not None and self._find(0, ReviewSubmitted.TYPE, self._offer.review_id) is not None:
            # In review until the process takes the submission in: a reassignment then would never be done.
            raise ValueError(
                f"the review by {self._offer.reviewer_id} was already submitted; a submitted review is not "
                "reassigned (ask the specialist a follow-up question once the report is delivered)"
            )
        if self._offer is not None and request.reviewer_id == self._offer.reviewer_id:
            raise ValueError(
                f"{request.reviewer_id} already holds this case; name another reviewer, or leave reviewer_id out "
                "for the next best match"
            )

    @workflow.update
    def document_communication(self, *received: Any) -> str:
        documented = _decision("document_communication", DocumentCommunication, received)
        told = documented.communication
        self._communication = DocumentedCommunication(
            **told.model_dump(), documented_by=documented.by, documented_at=workflow.now()
        )
        self._audit(
            "document_communication",
            documented,
            f"{told.method.replace('_', ' ')} to the {told.recipient_role} at {_utc(told.at)}",
        )
        return "communication documented; the report is composed with it"

    @document_communication.validator
    def _validate_document_communication(self, *received: Any) -> None:
        documented = _decision("document_communication", DocumentCommunication, received)
        self._require_open("document a communication")
        if self._communication is not None:
            raise ValueError(
                f"the communication was already documented by {self._communication.documented_by} "
                f"at {_utc(self._communication.documented_at)}"
            )
        if not self._communication_awaited:
            raise ValueError(
                "no communication is awaited: only a critical result or major discrepancy the specialist "
                f"submitted without one waits for it (status {self._status.value})"
            )
        told_at, now = documented.communication.at, workflow.now()
        if told_at > now + CLOCK_SKEW:
            raise ValueError(
                f"the communication is dated {_utc(told_at)}, later than now ({_utc(now)}); "
                "document it once the referring physician has been told, with the time they were"
            )
        if self._started_at is not None and told_at < self._started_at:
            raise ValueError(
                f"the communication is dated {_utc(told_at)}, before the case began ({_utc(self._started_at)}); "
                "give the time the referring physician was told of this second opinion's finding"
            )

    @workflow.update
    async def hold(self, *received: Any) -> str:
        request = _decision("hold", HoldCase, received)
        self._hold = request
        self._status_before_hold = self._status
        self._audit("hold", request)
        await self._transition(CaseStatus.ON_HOLD, f"on hold by {request.by}: {request.reason}")
        return "case on hold; the due date keeps running"

    @hold.validator
    def _validate_hold(self, *received: Any) -> None:
        _decision("hold", HoldCase, received)
        self._require_open("put on hold")
        if self._hold is not None:
            raise ValueError("the case is already on hold")

    @workflow.update
    async def resume(self, *received: Any) -> str:
        request = _decision("resume", ResumeCase, received)
        previous = self._status_before_hold or CaseStatus.INTAKE
        self._hold = None
        self._status_before_hold = None
        self._audit("resume", request)
        await self._transition(previous, f"resumed by {request.by}")
        return f"resumed in {previous.value}"

    @resume.validator
    def _validate_resume(self, *received: Any) -> None:
        _decision("resume", ResumeCase, received)
        self._require_open("resume", held_too=False)  # a case that ended on hold is resumed to let it end
        if self._hold is None:
            raise ValueError("the case is not on hold")

    @workflow.update
    def ask_question(self, *received: Any) -> str:
        question = _decision("ask_question", FollowUpQuestion, received)
        self._questions.append(question)
        self._audit("ask_question", question, f"question {question.question_id}")
        return f"question {len(self._questions)} of {self._policy_max_questions()} sent to the specialist"

    @ask_question.validator
    def _validate_question(self, *received: Any) -> None:
        question = _decision("ask_question", FollowUpQuestion, received)
        self._require_open("ask a question")
        if self._delivered_at is None:  # from then on, also while an addendum is being delivered
            raise ValueError(f"questions are taken after the report is delivered (status {self._where()})")
        if len(self._questions) >= self._policy_max_questions():
            raise ValueError(f"at most {self._policy_max_questions()} follow-up questions per case")
        if any(q.question_id == question.question_id for q in self._questions):
            raise ValueError(f"question {question.question_id} was already asked")

    @workflow.update
    def close(self, *received: Any) -> str:
        request = _decision("close", CloseCase, received)
        self._close = request
        self._audit("close", request)
        return "the case closes once pending follow-up questions are answered"

    @close.validator
    def _validate_close(self, *received: Any) -> None:
        _decision("close", CloseCase, received)
        self._require_open("close")
        if self._delivered_at is None:
            raise ValueError(f"a case closes after its report is delivered (status {self._where()})")
        if self._close is not None:
            raise ValueError(f"the case is already closing (asked by {self._close.by})")

    @workflow.query
    def status(self) -> CaseStatus:
        return self._status

    @workflow.query
    def timeline(self) -> list[TimelineItem]:
        return _first_and_latest(
            self._timeline,
            lambda count, first: TimelineItem(
                status=first.status, at=first.at, detail=_left_out(count), kind="note"
            ),
        )

    @workflow.query
    def decisions(self) -> list[DecisionRecord]:
        return self._decisions

    @workflow.query
    def alerts(self) -> list[AlertRecord]:
        return _first_and_latest(
            self._alerts,
            lambda count, first: AlertRecord(kind="left_out", at=first.at, detail=_left_out(count)),
        )

    @workflow.query
    def due_at(self) -> datetime | None:
        return self._due_at

    @workflow.query
    def received(self) -> list[str]:
        """The events the case has applied, as `type id`, in order (duplicates never appear)."""
        return _first_and_latest(
            [f"{event.type} {event.id}" for event in self._received], lambda count, _: _left_out(count)
        )

    @workflow.query
    def review(self) -> ReviewAssignment | None:
        if self._offer is None:
            return None
        return ReviewAssignment(
            review_id=self._offer.review_id,
            reviewer_id=self._offer.reviewer_id,
            accepted=self._reviewer is not None,
        )

    # ---- helpers -------------------------------------------------------------------------------

    def _event_problem(self, event: CloudEvent) -> str | None:
        """Why `event` cannot be applied to this case, or None. The bridge routes an event by its subject, one
        sent by hand need not be this case's; data that does not fit its type would fail the workflow task where
        the process reads it, on every retry. Left unseen, a corrected event may come under the same id."""
        if self._case is not None and event.subject != self._case.case_id:
            return f"it is about case {event.subject}, not this one"
        model = EVENT_TYPES.get(event.type)
        if model is None:
            return None
        try:
            data = model.model_validate(event.data)
        except ValidationError as invalid:
            return f"{problems_of(invalid)} (the same id may be sent again, corrected)"
        if data.case_id != event.subject:
            return f"its data is about case {data.case_id}, not this one"
        return None

    def _signal_input(self, signal: str, model: type[E], received: tuple[Any, ...]) -> E | None:
        """The one input of `signal` as `model`, or None once the timeline says why nothing was applied (by field
        and rule, never the values typed: they may be PHI)."""
        if len(received) == 1 and received[0] is not None:
            try:
                return model.model_validate(received[0])
            except ValidationError as invalid:
                problem = problems_of(invalid)
        elif received:
            problem = "its input was null" if len(received) == 1 else f"it carried {len(received)} inputs"
        else:
            problem = "it carried no input"
        fields = ", ".join(model.model_fields)
        self._note(f"signal {signal} ignored: {problem}; send it again with one JSON object ({fields})")
        return None

    def _policy_max_questions(self) -> int:
        return self._case.policy.max_follow_up_questions if self._case else 3

    def _standing(self) -> CaseStatus:
        """Where the process stands: under a hold, the status it resumes in. A decision due there is taken while
        on hold (what it sends waits for the resume); one that is not is refused as it would be unheld."""
        return self._status_before_hold if self._hold and self._status_before_hold else self._status

    def _where(self) -> str:
        return f"{self._standing().value} (on hold)" if self._hold else self._status.value

    def _require_open(self, what: str, held_too: bool = True) -> None:
        """Refuse a decision once the case is being cancelled or has ended, with `held_too` also where it ended
        on hold (what it sends waits for the resume, which only lets it end)."""
        if self._cancel is not None:
            raise ValueError(
                f"cannot {what}: the case is being cancelled (by {self._cancel.by}); nothing was changed"
            )
        if (self._standing() if held_too else self._status) in (CaseStatus.CLOSED, CaseStatus.CANCELLED):
            raise ValueError(f"cannot {what}: the case is {self._where()}")

    def _audit(self, name: str, decision: Decision, detail: str = "") -> None:
        self._decisions.append(
            DecisionRecord(
                name=name, by=decision.by, reason=decision.reason, at=workflow.now(), detail=detail
            )
        )

    def _note(self, detail: str, kind: str = "note") -> None:
        self._timeline.append(TimelineItem(status=self._status, at=workflow.now(), detail=detail, kind=kind))

    def _has(self, event_type: type[BaseModel]) -> bool:
        key = event_type.TYPE  # type: ignore[attr-defined]
        return any(e.type == key for e in self._received)

    def _latest(self, event_type: type[E]) -> E:
        key = event_type.TYPE  # type: ignore[attr-defined]
        event = next(e for e in reversed(self._received) if e.type == key)
        return event_type.model_validate(event.data)

    def _find(self, mark: int, type_: str, key: str, key_field: str = "review_id") -> CloudEvent | None:
        for event in self._received[mark:]:
            if event.type == type_ and event.data.get(key_field) == key:
                return event
        return None

    async def _answer(
        self, turn: str, sent_at: int, *types: str, key: str | None = None, key_field: str = ""
    ) -> tuple[CloudEvent, int]:
        """The answer to the request just sent on `turn`, which has one answer per request (a match, a
        delivery, a question): the first event of one of `types` (with data[key_field] == key, if given)
        after the previous answer on that turn. Returns it and the position it was looked up from; later
        events about the same request are there or after.

        Not "after the request was sent" (`sent_at`, as cases from before this change still look): a worker
        that dies after publishing a request, before Temporal recorded the step, has that step replayed
        later, and by then the answer may already stand in the history ahead of the replayed request. Looked
        up from the send, it was never found and the case waited at `matching` for ever."""
        start = self._answered.get(turn, 0) if self._patched(ANSWERS_IN_TURN) else sent_at

        def position() -> int | None:
            for index in range(start, len(self._received)):
                event = self._received[index]
                if event.type in types and (key is None or event.data.get(key_field) == key):
                    return index
            return None

        await workflow.wait_condition(lambda: position() is not None)
        found = position()
        assert found is not None
        self._answered[turn] = found + 1
        return self._received[found], start

    async def _wait_for(self, event_type: type[E]) -> E:
        await workflow.wait_condition(lambda: self._has(event_type))
        return self._latest(event_type)

    async def _wait_or_timeout(self, condition: Any, timeout: timedelta | None, summary: str) -> bool:
        """True when `condition` became true, False when `timeout` passed first. `summary` names the timer in
        the Temporal UI's history and timeline (what happens when it fires; no PHI)."""
        if timeout is not None and timeout <= timedelta(0):
            return bool(condition())
        try:
            await workflow.wait_condition(condition, timeout=timeout, timeout_summary=summary)
        except TimeoutError:
            return False
        return True

    def _set_due_at(self, due_at: datetime) -> None:
        self._due_at = due_at
        self._due_version += 1
        workflow.upsert_search_attributes([CASE_DUE_AT.value_set(due_at)])

    async def _alert(self, kind: str, detail: str) -> None:
        assert self._case is not None
        now = workflow.now()
        self._alerts.append(AlertRecord(kind=kind, at=now, detail=detail))
        self._note(f"{kind}: {detail}", kind="alert")
        self._show_details()
        await self._publish(
            CaseAlert.TYPE,
            CaseAlert(case_id=self._case.case_id, kind=kind, detail=detail, at=now, due_at=self._due_at),
            f"{CaseAlert.TYPE}: {kind}",
        )

    async def _send(self, command: Command) -> None:
        await workflow.wait_condition(lambda: self._hold is None)
        await self._run_publish(
            CaseActivities.publish_command,
            PublishCommand(case_id=command.case_id, type=command.TYPE, data=command.model_dump(mode="json")),
            command.TYPE,
        )

    async def _publish(self, type_: str, event: BaseModel, summary: str | None = None) -> None:
        assert self._case is not None
        await self._run_publish(
            CaseActivities.publish_event,
            PublishEvent(case_id=self._case.case_id, type=type_, data=event.model_dump(mode="json")),
            summary or type_,
        )

    async def _run_publish(self, method: Any, argument: BaseModel, summary: str) -> None:
        """Publishing is a local activity: one broker round trip recorded as a marker, instead of a task the
        server schedules, dispatches and records three times (with thousands of open cases the activity
        backlog moved at ~5 tasks/s). Cases started before that change replay their regular activities.
        `summary` says what goes out, for the Temporal UI's history (message types and statuses; no PHI)."""
        if self._patched(LOCAL_PUBLISH):
            await workflow.execute_local_activity_method(
                method,
                argument,
                start_to_close_timeout=PUBLISH_TIMEOUT,
                retry_policy=PUBLISH_RETRY,
                summary=summary,
            )
            return
        await workflow.execute_activity_method(
            method,
            argument,
            start_to_close_timeout=PUBLISH_TIMEOUT,
            retry_policy=PUBLISH_RETRY,
            summary=summary,
        )

    async def _transition(self, status: CaseStatus, detail: str, then: Sequence[Command] = ()) -> int:
        """Enter `status` and announce it, then send the commands `then` asks for. Returns the mark from
        which their answers are looked up (`len(self._received)` before any of them was sent)."""
        assert self._case is not None
        if self._hold is not None and status != CaseStatus.ON_HOLD:
            # While on hold the process only records where it stands; resume restores that state.
            self._status_before_hold = status
            self._note(f"(on hold) {detail}")
            return await self._send_all(then)
        previous, self._status = self._status, status
        now = workflow.now()
        self._status_since = now
        self._timeline.append(TimelineItem(status=status, at=now, detail=detail))
        workflow.upsert_search_attributes([CASE_STATUS.value_set(status.value)])
        self._show_details()
        # Numbered as made: one workflow task may make two (a hold and a resume) at one `at`, whose messages can
        # reach intake in either order. A number in the message, no new command: nothing to patch.
        self._status_changes += 1
        changed = CaseStatusChanged(
            case_id=self._case.case_id,
            status=status,
            previous=previous,
            at=now,
            detail=detail,
            seq=self._status_changes,
        )
        if then and self._patched(BATCH_PUBLISH):
            # One local activity for the step: the status change and its commands, in this order.
            mark = len(self._received)
            messages = [Outgoing(kind="event", type=changed.TYPE, data=changed.model_dump(mode="json"))]
            messages += [Outgoing(kind="command", type=c.TYPE, data=c.model_dump(mode="json")) for c in then]
            await self._run_publish(
                CaseActivities.publish_batch,
                PublishBatch(case_id=self._case.case_id, messages=messages),
                f"{changed.TYPE}: {status.value}, then {', '.join(c.TYPE for c in then)}",
            )
            return mark
        await self._publish(CaseStatusChanged.TYPE, changed, f"{CaseStatusChanged.TYPE}: {status.value}")
        return await self._send_all(then)

    async def _send_all(self, commands: Sequence[Command]) -> int:
        """Send `commands` side by side, each a local activity of its own (and each waiting out a hold)."""
        mark = len(self._received)
        if len(commands) == 1:
            await self._send(commands[0])
        elif commands:
            await asyncio.gather(*(self._send(command) for command in commands))
        return mark

    def _show_details(self) -> None:
        """Markdown for the Temporal UI: what the case waits for, since when, what is due. No PHI."""
        lines = [f"**Status:** `{self._status.value}`"]
        waiting = WAITING_STATES.get(self._status)
        if waiting:
            lines.append(f"**Waiting for:** {waiting}")
        if self._status_since:
            lines.append(f"**Since:** {self._status_since:%Y-%m-%d %H:%M} UTC")
        if self._due_at:
            lines.append(f"**Due:** {self._due_at:%Y-%m-%d %H:%M} UTC")
        if self._status == CaseStatus.AWAITING_RECORDS:
            lines.append(f"**Reminders sent:** {self._reminders_sent}")
            if self._has(RecordsIncomplete):
                lines.append(f"**Missing:** {', '.join(self._latest(RecordsIncomplete).missing)}")
        if self._reviewer:
            lines.append(f"**Reviewer:** {self._reviewer}")
        if self._hold:
            lines.append(f"**On hold by** {self._hold.by}: {self._hold.reason}")
        for alert in self._alerts[-3:]:
            lines.append(f"**Alert** ({alert.kind}, {alert.at:%Y-%m-%d %H:%M}): {alert.detail}")
        workflow.set_current_details("\n\n".join(lines))
