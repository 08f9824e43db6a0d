"""The case's events applied by two intake replicas at once, on the real PostgreSQL: one side is paused at the
point that matters, so each race runs the same way every time."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CaseStatus, CaseStatusChanged, new_event
from contracts.envelope import CloudEvent
from services.common.config import Settings
from services.intake import consumer, handlers
from services.intake.models import Case, CaseCreate
from tests.integration.intake_app import intake_engines
from tests.integration.test_intake_api import SAMPLE


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


def status_event(case_id: str, status: CaseStatus, at: datetime) -> CloudEvent:
    data = CaseStatusChanged(case_id=case_id, status=status, previous=None, at=at)
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
