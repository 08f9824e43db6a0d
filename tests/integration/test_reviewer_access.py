"""Minimum necessary: a specialist reads a case's records (DICOMweb, downloads) while the case is offered to or
assigned to them, and afterwards only as the author of its report. Declined, lapsed, reassigned away or
cancelled, they get the 404 every stranger gets. On the real PostgreSQL: the review service's handlers and API,
the records service's API and DICOMweb, and the auth registry between them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command as alembic
from fastapi.testclient import TestClient
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from contracts import CollectRecords, new_event
from contracts.commands import CloseReview, MatchSpecialist
from contracts.envelope import CloudEvent
from services.auth import auth_engine, tenancy
from services.auth.models import AuditEvent
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine, make_engine
from services.common.http import create_app
from services.records import api as records_api
from services.records import consumer as records_consumer
from services.records import dicomweb
from services.review import access
from services.review.models import Review, ReviewerAccessChange
from tests.dicom_factory import make_us_instance
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import FINDINGS, apply, offered_review, outbox_event
from tests.integration.test_review_offers import cancelled_event, rematch, withdraw_command
from tests.keys import operations_headers, specialist_headers

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


@dataclass
class Records:
    """The records service's API and DICOMweb, and one stored image of each case opened on it."""

    client: TestClient
    settings: Settings

    def open_case(self, match: CloudEvent) -> CaseRecords:
        """The case's records as `records.collect` requests them, and one ultrasound image sent by STOW-RS."""
        request = MatchSpecialist.model_validate(match.data)
        case_id = request.case_id
        collect = CollectRecords(case_id=case_id, patient=request.patient, exam=request.exam)
        with Session(get_engine("records")) as session:
            records_consumer.handle(
                session,
                new_event(id=str(uuid.uuid4()), source="/t", data=collect, subject=case_id),
                self.settings,
            )
            session.commit()
        study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
        image = make_us_instance(
            None, study_uid=study, series_uid=study + ".1", patient_id=request.patient.mrn or ""
        )
        body = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + image + b"\r\n--b0--\r\n"
        stored = self.client.post(
            f"/dicomweb/cases/{case_id}/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0',
                **operations_headers(self.settings),
            },
        )
        # 202: stored, with the Patient ID we hand out (warning B000)
        assert stored.status_code in (200, 202) and "00081198" not in stored.json(), stored.text
        files = self.client.get(f"/v1/records/{case_id}", headers=operations_headers(self.settings)).json()
        return CaseRecords(self, case_id, study, files["files"][0]["sha256"])


@dataclass
class CaseRecords:
    records: Records
    case_id: str
    study: str
    sha256: str

    def read_as(self, specialist_id: str) -> list[int]:
        """What the specialist's key gets from QIDO-RS, WADO-RS, the file download and the case's records."""
        headers = specialist_headers(self.records.settings, specialist_id)
        paths = (
            f"/dicomweb/cases/{self.case_id}/studies",
            f"/dicomweb/cases/{self.case_id}/studies/{self.study}",
            f"/v1/records/{self.case_id}/files/{self.sha256}",
            f"/v1/records/{self.case_id}",
        )
        return [self.records.client.get(path, headers=headers).status_code for path in paths]


def auth_unreachable(*args: object, **kwargs: object) -> None:
    """In place of tenancy.settle_reviewer: the auth schema does not answer."""
    raise OperationalError("SELECT 1", {}, Exception("connection refused"))


READS = [200, 200, 200, 200]
STRANGER = [404, 404, 404, 404]


@pytest.fixture(scope="module")
def records(settings: Settings) -> Iterator[Records]:
    get_engine.cache_clear()  # the handlers' engines must point at this session's database
    for name in ("auth", "records"):
        migrate.upgrade(name, get_engine(name))
    app = create_app(
        "records", routers=[records_api.router, dicomweb.router], engine=lambda: get_engine("records")
    )
    app.dependency_overrides[auth_engine] = lambda: get_engine("auth")
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as test_client:
        yield Records(test_client, settings)


def test_a_stranger_specialist_gets_404_and_the_offered_one_reads_the_case(
    engine: Engine, settings: Settings, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)

    assert case.read_as(offered["reviewer_id"]) == READS
    assert case.read_as("spec-ob-1") == STRANGER


def test_a_specialist_who_declines_loses_access_to_the_case(
    engine: Engine, settings: Settings, client: TestClient, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    reviewer = offered["reviewer_id"]
    assert case.read_as(reviewer) == READS

    declined = client.post(
        f"/v1/reviews/{offered['review_id']}/decline",
        json={"reason": "conflict of interest"},
        headers=specialist_headers(settings, reviewer),
    )

    assert declined.status_code == 200, declined.text
    assert case.read_as(reviewer) == STRANGER
    assert review_read_as(client, settings, reviewer, offered["review_id"]) == (404, [])


def test_a_specialist_whose_offer_lapsed_loses_access_to_the_case(
    engine: Engine, settings: Settings, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)

    withdraw = withdraw_command(command.subject, offered["review_id"], reason="expired")
    apply(engine, settings, withdraw)
    apply(engine, settings, withdraw)  # the workflow's timer may send it twice

    assert case.read_as(offered["reviewer_id"]) == STRANGER


def test_a_specialist_reassigned_away_loses_access_and_the_new_one_reads_the_case(
    engine: Engine, settings: Settings, client: TestClient, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    first = offered["reviewer_id"]
    assert client.post(f"/v1/reviews/{offered['review_id']}/accept").status_code == 200

    apply(engine, settings, withdraw_command(command.subject, offered["review_id"], reason="reassigned"))
    again = rematch(command, 2, exclude=[first])
    apply(engine, settings, again)
    second = outbox_event(engine, f"{again.id}>review.offered").data["reviewer_id"]

    assert second != first
    assert case.read_as(first) == STRANGER
    assert case.read_as(second) == READS
    assert review_read_as(client, settings, first, offered["review_id"]) == (404, [])


def test_cancelling_the_case_ends_the_offered_specialists_access(
    engine: Engine, settings: Settings, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)

    apply(engine, settings, cancelled_event(command.subject))

    assert case.read_as(offered["reviewer_id"]) == STRANGER


def test_offering_the_case_again_to_a_specialist_who_declined_grants_access_again(
    engine: Engine, settings: Settings, client: TestClient, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    reviewer = offered["reviewer_id"]
    client.post(f"/v1/reviews/{offered['review_id']}/decline", json={"reason": "away this week"})
    assert case.read_as(reviewer) == STRANGER

    # Operations ask for them by name after all (update reassign_reviewer with reviewer_id).
    again = command.model_copy(
        update={
            "id": f"case-{command.subject}:match-2",
            "data": command.data | {"preferred_reviewer": reviewer},
        }
    )
    apply(engine, settings, again)

    assert outbox_event(engine, f"{again.id}>review.offered").data["reviewer_id"] == reviewer
    assert case.read_as(reviewer) == READS


def test_the_author_of_the_report_keeps_reading_the_case_through_follow_up_and_after_it_closes(
    engine: Engine, settings: Settings, client: TestClient, records: Records
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    reviewer, review_id = offered["reviewer_id"], offered["review_id"]
    assert client.post(f"/v1/reviews/{review_id}/accept").status_code == 200
    signed = client.post(
        f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings, reviewer)
    )
    assert signed.status_code == 200, signed.text

    # A reassignment that crossed the submission: the signed review stands, and so does its author's access.
    apply(engine, settings, withdraw_command(command.subject, review_id, reason="reassigned"))
    assert case.read_as(reviewer) == READS
    close = CloseReview(case_id=command.subject, reason="follow-up window ended")
    apply(
        engine,
        settings,
        new_event(
            id=f"case-{command.subject}:close", source="/workflows", data=close, subject=command.subject
        ),
    )

    assert case.read_as(reviewer) == READS
    assert review_read_as(client, settings, reviewer, review_id) == (200, [review_id])


def test_each_grant_and_revocation_is_in_the_audit_log_once_for_the_case_and_its_partner(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, offered = offered_review(engine, settings, partner_id="clinic-audit")
    reviewer, review_id = offered["reviewer_id"], offered["review_id"]
    client.post(f"/v1/reviews/{review_id}/accept")  # settled again: nothing changes, nothing is written
    withdraw = withdraw_command(command.subject, review_id, reason="reassigned")
    apply(engine, settings, withdraw)
    apply(engine, settings, withdraw)

    granted = f"{reviewer} may read the case's records and report: the case is offered to them"
    revoked = f"{reviewer} may no longer read the case's records and report: the case was reassigned"
    assert access_log(command.subject) == [
        ("create", "clinic-audit", f"{granted} (review {review_id})"),
        ("delete", "clinic-audit", f"{revoked} (review {review_id})"),
    ]


def test_a_settlement_that_runs_late_applies_the_reviews_as_committed_now(
    engine: Engine, settings: Settings, client: TestClient, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The offer's grant is held up (a slow thread, a pool wait) until after the decline has been settled.
    held: list[tuple[str, str]] = []
    monkeypatch.setattr(access, "_settle_now", lambda _engine, case_id, spec: held.append((case_id, spec)))
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    monkeypatch.undo()
    reviewer = offered["reviewer_id"]
    client.post(f"/v1/reviews/{offered['review_id']}/decline", json={"reason": "conflict of interest"})

    [(case_id, specialist_id)] = held
    assert access.settle(engine, get_engine("auth"), case_id, specialist_id) is None  # nothing to grant

    assert case.read_as(reviewer) == STRANGER


def test_settlements_of_one_pair_take_turns(records: Records) -> None:
    # Settlement A read "may read" and has not committed; B, started meanwhile, reads only once A is done.
    auth, case_id = get_engine("auth"), f"case-{uuid.uuid4().hex[:8]}"
    order: list[str] = []
    a_reading, a_may_go = threading.Event(), threading.Event()

    def a_reads() -> tenancy.ReviewerStanding:
        order.append("A reads")
        a_reading.set()
        a_may_go.wait(10)
        order.append("A goes on")
        return tenancy.ReviewerStanding(True, "offered")

    def b_reads() -> tenancy.ReviewerStanding:
        order.append("B reads")
        return tenancy.ReviewerStanding(False, "declined")

    a = threading.Thread(
        target=tenancy.settle_reviewer, args=(auth, case_id, "spec-x", a_reads), kwargs={"service": "t"}
    )
    b = threading.Thread(
        target=tenancy.settle_reviewer, args=(auth, case_id, "spec-x", b_reads), kwargs={"service": "t"}
    )
    a.start()
    assert a_reading.wait(10)
    b.start()
    time.sleep(0.3)
    a_may_go.set()
    a.join(10)
    b.join(10)

    assert order == ["A reads", "A goes on", "B reads"]
    assert [action for action, _, _ in access_log(case_id)] == ["create", "delete"]


def test_a_revocation_the_auth_schema_missed_is_settled_by_the_loop(
    engine: Engine, settings: Settings, client: TestClient, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    reviewer = offered["reviewer_id"]

    monkeypatch.setattr(tenancy, "settle_reviewer", auth_unreachable)
    declined = client.post(f"/v1/reviews/{offered['review_id']}/decline", json={"reason": "away"})
    monkeypatch.undo()

    assert declined.status_code == 200  # the decline stands; its settlement waits
    assert case.read_as(reviewer) == READS
    assert noted(engine, command.subject) == [reviewer]
    loop = access.SettlingLoop(engine, get_engine("auth"), interval=0.05)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while noted(engine, command.subject) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()

    assert noted(engine, command.subject) == []
    assert case.read_as(reviewer) == STRANGER


def test_a_decline_a_review_service_from_before_left_without_a_note_is_found_by_the_sweep(
    engine: Engine, settings: Settings, client: TestClient, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling upgrade, a review process of the earlier version declines after the migration noted the
    earlier declines: no note, no revocation. The sweep at each start settles every pair the registry grants."""
    command, offered = offered_review(engine, settings)
    case = records.open_case(command)
    reviewer = offered["reviewer_id"]
    kept, kept_offer = offered_review(engine, settings)
    kept_case = records.open_case(kept)

    monkeypatch.setattr(tenancy, "settle_reviewer", auth_unreachable)
    assert (
        client.post(f"/v1/reviews/{offered['review_id']}/decline", json={"reason": "away"}).status_code == 200
    )
    monkeypatch.undo()
    with Session(engine) as session:  # the earlier version wrote no note
        session.execute(
            delete(ReviewerAccessChange).where(col(ReviewerAccessChange.case_id) == command.subject)
        )
        session.commit()
    assert case.read_as(reviewer) == READS

    assert access.sweep_registry(engine, get_engine("auth"), page=2) >= 1  # pages of two: the walk goes on

    assert case.read_as(reviewer) == STRANGER
    assert kept_case.read_as(kept_offer["reviewer_id"]) == READS  # an offer that stands keeps its access


def test_the_migration_revokes_access_left_behind_by_past_declines(tmp_path: Path) -> None:
    sqlite = make_engine("review", Settings(data_dir=tmp_path, database_url=None))
    alembic.upgrade(migrate.alembic_config("review", sqlite), "0009")
    request = flow.match_command().data
    with Session(sqlite) as session:
        for status, specialist in (
            ("declined", "spec-gyn-1"),
            ("withdrawn", "spec-gyn-2"),
            ("submitted", "spec-ob-1"),
        ):
            session.add(
                Review(
                    id=str(uuid.uuid4()),
                    case_id="case-old",
                    reviewer_id=specialist,
                    subspecialty="gynecologic_imaging",
                    status=status,
                    match_event_id=str(uuid.uuid4()),
                    match_explanation="",
                    request=request,
                    exam_type="pelvic",
                    urgency="standard",
                    due_at=datetime.now(UTC),
                )
            )
        session.commit()

    migrate.upgrade("review", sqlite)

    assert sorted(noted(sqlite, "case-old")) == ["spec-gyn-1", "spec-gyn-2"]
    sqlite.dispose()


def review_read_as(
    client: TestClient, settings: Settings, specialist_id: str, review_id: str
) -> tuple[int, list[str]]:
    """What the specialist's key gets from the review's detail, and which of its reviews (of any status) it lists:
    the review API's own answer, beside records'."""
    headers = specialist_headers(settings, specialist_id)
    detail = client.get(f"/v1/reviews/{review_id}", headers=headers).status_code
    listed = [
        item["review_id"]
        for status in ("offered", "accepted", "submitted", "declined", "withdrawn")
        for item in client.get("/v1/reviews", params={"status": status}, headers=headers).json()
        if item["review_id"] == review_id
    ]
    return detail, listed


def access_log(case_id: str) -> list[tuple[str, str | None, str]]:
    with Session(get_engine("auth")) as session:
        rows = session.exec(
            select(AuditEvent)
            .where(AuditEvent.case_id == case_id, AuditEvent.resource == tenancy.REVIEWER_ACCESS)
            .order_by(col(AuditEvent.id))
        ).all()
    return [(row.action, row.partner_id, row.detail) for row in rows]


def noted(engine: Engine, case_id: str) -> list[str]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(ReviewerAccessChange.specialist_id).where(ReviewerAccessChange.case_id == case_id)
            ).all()
        )
