"""The case's events applied by two intake replicas at once, on the real PostgreSQL: one side is paused at the
point that matters, so each race runs the same way every time."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CaseStatus, CaseStatusChanged, new_event
from contracts.envelope import CloudEvent
from contracts.events import CaseCancelled
from services.common.amqp import Consumer
from services.common.config import Settings
from services.intake import api, consumer, handlers, webhooks_out
from services.intake.models import Case, CaseCreate, CaseDocument, CaseTimelineEntry
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return intake_engines(settings)[0]


def a_case(engine: Engine) -> str:
    request = CaseCreate.model_validate(SAMPLE | {"partner_case_ref": str(uuid.uuid4())})
    with Session(engine) as session:
        case = handlers.new_case(
            request, "partner-race", session, now=datetime.now(UTC) - timedelta(minutes=1)
        )
        session.commit()
        return case.id


def status_event(case_id: str, status: CaseStatus, at: datetime, seq: int | None = None) -> CloudEvent:
    data = CaseStatusChanged(case_id=case_id, status=status, previous=None, at=at, seq=seq)
    return new_event(id=str(uuid.uuid4()), source="/workflows/case", subject=case_id, data=data)


def apply(engine: Engine, event: CloudEvent) -> None:
    with Session(engine) as session:
        consumer.handle(session, event)
        session.commit()


def test_a_status_change_read_before_a_later_one_committed_does_not_overwrite_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas apply the workflow's transitions to records and then to review: the later one stands,
    whichever commits last."""
    case_id = a_case(engine)
    now = datetime.now(UTC)
    earlier = status_event(case_id, CaseStatus.AWAITING_RECORDS, now - timedelta(seconds=2))
    later = status_event(case_id, CaseStatus.AWAITING_ACCEPTANCE, now)
    read, go = threading.Event(), threading.Event()
    aware = handlers._aware

    def paused(moment: datetime) -> datetime:
        if threading.current_thread().name == "earlier":
            read.set()  # the case is read; its status is about to be compared and written
            assert go.wait(10)
        return aware(moment)

    monkeypatch.setattr(handlers, "_aware", paused)
    failures: list[BaseException] = []

    def applying(event: CloudEvent) -> None:
        try:
            apply(engine, event)
        except BaseException as exc:
            failures.append(exc)

    first = threading.Thread(target=applying, args=(earlier,), name="earlier")
    first.start()
    assert read.wait(10)
    second = threading.Thread(target=applying, args=(later,), name="later")
    second.start()
    second.join(0.5)  # the later change commits now, unless it must wait for the earlier one
    go.set()
    first.join(10)
    second.join(10)

    assert failures == []
    with Session(engine) as session:
        case = session.get(Case, case_id)
        assert case is not None
        assert case.status == CaseStatus.AWAITING_ACCEPTANCE


def test_a_document_sent_while_the_cancellation_is_applied_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancellation is being applied (the case locked, not yet committed) when a document arrives: the
    document waits for it and is refused, never stored in a cancelled case."""
    intake, auth = intake_engines(settings)
    partner = new_partner(auth, "Late Sender")
    with TestClient(intake_app((intake, auth), api.router)) as client:
        headers = {"Authorization": partner["Authorization"]}
        case_id = client.post("/v1/cases", json=SAMPLE, headers=headers).json()["case_id"]
        applying, go = threading.Event(), threading.Event()
        withdraw = webhooks_out.withdraw

        def paused(*args: Any, **kwargs: Any) -> None:
            applying.set()  # the case is marked cancelled in the uncommitted transaction
            assert go.wait(10)
            withdraw(*args, **kwargs)

        monkeypatch.setattr(webhooks_out, "withdraw", paused)
        cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="ops-1")
        event = new_event(id=str(uuid.uuid4()), source="/workflows/case", subject=case_id, data=cancelled)
        cancelling = threading.Thread(target=apply, args=(intake, event))
        cancelling.start()
        assert applying.wait(10)
        answers: list[Any] = []
        note = {
            "kind": "clinical_note",
            "title": "note",
            "content_type": "text/plain",
            "content_base64": "aGk=",
        }
        sending = threading.Thread(
            target=lambda: answers.append(
                client.post(f"/v1/cases/{case_id}/documents", json=note, headers=headers)
            )
        )
        sending.start()
        sending.join(0.5)  # the document is stored now, unless it waits for the cancellation
        go.set()
        cancelling.join(10)
        sending.join(10)

    assert answers[0].status_code == 409, answers[0].text
    assert answers[0].json()["detail"] == "the case is cancelled; documents are closed"
    with Session(intake) as session:
        assert session.exec(select(CaseDocument).where(CaseDocument.case_id == case_id)).all() == []


def mirrored_status(engine: Engine, case_id: str) -> str:
    with Session(engine) as session:
        case = session.get(Case, case_id)
        assert case is not None
        return case.status


def test_a_hold_and_a_resume_made_in_one_workflow_task_show_the_resume_whichever_is_applied_last(
    engine: Engine, settings: Settings
) -> None:
    """One workflow task put the case on hold and resumed it: both status changes carry one `at`, and their
    messages reach intake in either order. The mirror kept whichever was applied last, and could show `on_hold`
    for a case that was resumed."""
    case_id = a_case(engine)
    now = datetime.now(UTC)
    apply(engine, status_event(case_id, CaseStatus.AWAITING_RECORDS, now - timedelta(seconds=5), seq=1))
    held = status_event(case_id, CaseStatus.ON_HOLD, now, seq=2)
    resumed = status_event(case_id, CaseStatus.AWAITING_RECORDS, now, seq=3)
    apply(engine, resumed)
    apply(engine, held)
    assert mirrored_status(engine, case_id) == CaseStatus.AWAITING_RECORDS

    # Applied together by intake's consumer, in one batch and transaction, in the wrong order: the same.
    matching = status_event(case_id, CaseStatus.MATCHING, now + timedelta(seconds=1), seq=5)
    held_again = status_event(case_id, CaseStatus.ON_HOLD, now + timedelta(seconds=1), seq=4)
    intake = Consumer(settings=settings, queue="intake", engine=engine, handle=consumer.handle)
    assert intake.apply_batch([matching, held_again]) == [True, True]
    assert mirrored_status(engine, case_id) == CaseStatus.MATCHING
    with Session(engine) as session:  # the timeline keeps every change, in the order the workflow made them
        timeline = session.exec(select(CaseTimelineEntry).where(CaseTimelineEntry.case_id == case_id)).all()
        assert {entry.event_id for entry in timeline} >= {held.id, resumed.id, matching.id, held_again.id}

    # A status change still queued from a worker before the numbering is ordered by time, as before.
    apply(engine, status_event(case_id, CaseStatus.IN_REVIEW, now + timedelta(seconds=2)))
    assert mirrored_status(engine, case_id) == CaseStatus.IN_REVIEW
    apply(engine, status_event(case_id, CaseStatus.MATCHING, now - timedelta(seconds=9)))
    assert mirrored_status(engine, case_id) == CaseStatus.IN_REVIEW

    # A cancelled case stays cancelled, whatever arrives after the cancellation.
    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="ops-1")
    apply(engine, new_event(id=str(uuid.uuid4()), source="/workflows/case", subject=case_id, data=cancelled))
    apply(engine, status_event(case_id, CaseStatus.COMPOSING_REPORT, now + timedelta(days=1), seq=9))
    assert mirrored_status(engine, case_id) == CaseStatus.CANCELLED
