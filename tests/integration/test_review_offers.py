"""Offers on the real PostgreSQL: accept, decline, withdrawal by the workflow, cancellation, drafts."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts.commands import WithdrawOffer
from contracts.envelope import CloudEvent, new_event
from contracts.events import CaseCancelled
from services.common.config import Settings
from services.common.db import Outbox
from tests.integration import test_review_flow as flow
from tests.integration.test_review_flow import (
    FINDINGS,
    apply,
    match_command,
    offered_review,
    outbox_event,
)
from tests.keys import specialist_headers

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


def withdraw_command(case_id: str, review_id: str, reason: str = "expired") -> CloudEvent:
    command = WithdrawOffer(case_id=case_id, review_id=review_id, reason=reason)
    return new_event(
        id=f"case-{case_id}:withdraw-{review_id}", source="/workflows", data=command, subject=case_id
    )


def cancelled_event(case_id: str) -> CloudEvent:
    event = CaseCancelled(case_id=case_id, reason="patient withdrew the request", cancelled_by="ops-1")
    return new_event(id=f"case-{case_id}:cancelled", source="/workflows", data=event, subject=case_id)


def status(client: TestClient, review_id: str) -> str:
    return str(client.get(f"/v1/reviews/{review_id}").json()["status"])


def test_an_offer_shows_as_offered_until_the_specialist_accepts_it(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, offered = offered_review(engine, settings)
    review_id = offered["review_id"]

    before = client.get("/v1/reviews", params={"reviewer": "spec-gyn-1"}).json()
    accepted = client.post(f"/v1/reviews/{review_id}/accept", params={"reviewer": "spec-gyn-1"})
    again = client.post(f"/v1/reviews/{review_id}/accept", params={"reviewer": "spec-gyn-1"})

    assert [(i["review_id"], i["status"]) for i in before] == [(review_id, "offered")]
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "accepted"
    assert again.status_code == 200  # accepting twice changes nothing
    event = outbox_event(engine, f"review.accepted:{review_id}")
    assert event.data == {"case_id": command.subject, "review_id": review_id, "reviewer_id": "spec-gyn-1"}
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.routing_key == "review.accepted")).all()
    assert len(rows) == 1


def test_a_declined_offer_leaves_the_worklist_and_announces_the_reason(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, offered = offered_review(engine, settings)
    review_id = offered["review_id"]

    no_reason = client.post(f"/v1/reviews/{review_id}/decline", json={})
    declined = client.post(f"/v1/reviews/{review_id}/decline", json={"reason": "on call all week"})
    late_accept = client.post(f"/v1/reviews/{review_id}/accept")

    assert no_reason.status_code == 422
    assert [e["field"] for e in no_reason.json()["errors"]] == ["reason"]
    assert declined.status_code == 200
    assert declined.json()["decline_reason"] == "on call all week"
    assert outbox_event(engine, f"review.declined:{review_id}").data == {
        "case_id": command.subject,
        "review_id": review_id,
        "reviewer_id": "spec-gyn-1",
        "reason": "on call all week",
    }
    assert late_accept.status_code == 409
    assert "you declined it at" in late_accept.json()["detail"]
    assert client.get("/v1/reviews", params={"reviewer": "spec-gyn-1"}).json() == []


def test_an_expired_offer_cannot_be_accepted_and_frees_the_specialist(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    state_with_one_reader = {
        "id": f"spec-ak-{uuid.uuid4().hex[:6]}",
        "display_name": "Nora Aleut",
        "credentials": "MD",
        "npi": "1992753880",
        "subspecialties": ["breast_imaging"],
        "licensed_states": ["AK"],
        "organization": "Anchorage Breast Imaging",
        "max_open_reviews": 1,
    }
    assert client.post("/v1/specialists", json=state_with_one_reader).status_code == 201
    first, offered = offered_review(engine, settings, exam_type="breast", state="AK")
    full = match_command("breast", "AK")
    apply(engine, settings, full)

    withdraw = withdraw_command(first.subject, offered["review_id"])
    apply(engine, settings, withdraw)
    apply(engine, settings, withdraw)  # the workflow's timer may fire the command twice
    late = client.post(f"/v1/reviews/{offered['review_id']}/accept")
    after = match_command("breast", "AK")
    apply(engine, settings, after)

    assert "open-review limit" in outbox_event(engine, f"{full.id}>review.unmatched").data["reason"]
    assert late.status_code == 409
    assert "the offer expired at" in late.json()["detail"]
    assert status(client, offered["review_id"]) == "withdrawn"
    assert (
        outbox_event(engine, f"{after.id}>review.offered").data["reviewer_id"] == state_with_one_reader["id"]
    )
    client.delete(f"/v1/specialists/{state_with_one_reader['id']}")


def test_cancelling_the_case_withdraws_the_open_review_once(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, offered = offered_review(engine, settings)
    client.post(f"/v1/reviews/{offered['review_id']}/accept")

    apply(engine, settings, cancelled_event(command.subject))
    apply(engine, settings, cancelled_event(command.subject))
    submit = client.post(
        f"/v1/reviews/{offered['review_id']}", json=FINDINGS, headers=specialist_headers(settings)
    )

    detail = client.get(f"/v1/reviews/{offered['review_id']}").json()
    assert (detail["status"], detail["withdrawn_reason"]) == ("withdrawn", "cancelled")
    assert submit.status_code == 409
    assert "(cancelled)" in submit.json()["detail"]


def test_a_specialist_sees_only_their_own_reviews(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    _, offered = offered_review(engine, settings)
    review_id = offered["review_id"]

    as_other = client.get(f"/v1/reviews/{review_id}", params={"reviewer": "spec-ob-1"})
    accept_as_other = client.post(f"/v1/reviews/{review_id}/accept", params={"reviewer": "spec-ob-1"})

    assert as_other.status_code == 404
    assert accept_as_other.status_code == 404
    assert status(client, review_id) == "offered"


def test_submitting_before_accepting_is_refused(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    _, offered = offered_review(engine, settings)

    response = client.post(
        f"/v1/reviews/{offered['review_id']}", json=FINDINGS, headers=specialist_headers(settings)
    )

    assert response.status_code == 409
    assert "accept the offer first" in response.json()["detail"]


def test_drafts_are_kept_until_submission_and_refused_after(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    _, offered = offered_review(engine, settings)
    review_id = offered["review_id"]
    draft: dict[str, Any] = {"agreement": "minor_discrepancy", "findings": "So far: no flow in the nodule."}

    too_early = client.put(f"/v1/reviews/{review_id}/draft", json=draft)
    client.post(f"/v1/reviews/{review_id}/accept")
    saved = client.put(f"/v1/reviews/{review_id}/draft", json=draft)
    bad = client.put(f"/v1/reviews/{review_id}/draft", json={"agreement": "maybe"})
    client.post(f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings))
    after = client.put(f"/v1/reviews/{review_id}/draft", json=draft)

    assert too_early.status_code == 409
    assert saved.status_code == 200
    assert saved.json()["draft"] == {**dict.fromkeys(saved.json()["draft"]), **draft}
    assert bad.status_code == 422
    assert after.status_code == 409
    detail = client.get(f"/v1/reviews/{review_id}").json()
    assert detail["draft"] is None
    assert detail["findings"]["agreement"] == FINDINGS["agreement"]


def rematch(command: CloudEvent, attempt: int, exclude: list[str]) -> CloudEvent:
    again = command.data | {"exclude_reviewers": exclude}
    return command.model_copy(update={"id": f"case-{command.subject}:match-{attempt}", "data": again})


def test_a_review_submitted_as_the_workflow_withdraws_it_stands_and_no_second_reader_is_offered_it(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    # Operations reassigned the case while the specialist was submitting: the workflow decided "not
    # submitted" and sent a withdrawal, then a new match. The signed opinion must not be lost.
    command, offered = offered_review(engine, settings)
    review_id = offered["review_id"]
    client.post(f"/v1/reviews/{review_id}/accept")
    assert (
        client.post(
            f"/v1/reviews/{review_id}", json=FINDINGS, headers=specialist_headers(settings)
        ).status_code
        == 200
    )
    apply(engine, settings, withdraw_command(command.subject, review_id, reason="reassigned"))
    again = rematch(command, 2, exclude=["spec-gyn-1"])
    apply(engine, settings, again)

    assigned = outbox_event(engine, f"{again.id}>review.assigned").data
    assert (assigned["review_id"], assigned["reviewer_id"]) == (review_id, "spec-gyn-1")
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.message_id == f"{again.id}>review.offered")).all()
    assert rows == []  # nobody else was offered the case
    assert status(client, review_id) == "submitted"


def test_an_offer_accepted_just_before_it_lapsed_stays_with_its_specialist(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    command, offered = offered_review(engine, settings)
    review_id = offered["review_id"]
    assert client.post(f"/v1/reviews/{review_id}/accept").status_code == 200  # the specialist saw 200
    apply(engine, settings, withdraw_command(command.subject, review_id, reason="expired"))
    assert status(client, review_id) == "accepted"
    again = rematch(command, 2, exclude=["spec-gyn-1"])
    apply(engine, settings, again)
    assert outbox_event(engine, f"{again.id}>review.assigned").data["review_id"] == review_id


def test_a_rematch_applied_before_the_lapsed_offers_withdrawal_withdraws_it_first(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    """The workflow sends the lapsed offer's withdrawal, then the new match; with several review replicas the
    match can be applied first. The first specialist still held the offer and could accept it: the withdrawal
    then left their accepted review standing ("accepted before the lapse"), beside the second specialist's
    offer: two readers of one case."""
    command, offered = offered_review(engine, settings)
    review_id = offered["review_id"]
    withdraw = withdraw_command(command.subject, review_id, reason="expired")
    again = rematch(command, 2, exclude=["spec-gyn-1"])
    again = again.model_copy(update={"data": again.data | {"withdraw": withdraw.data}})
    apply(engine, settings, again)  # this replica takes the match ...

    late = client.post(f"/v1/reviews/{review_id}/accept")
    assert late.status_code == 409, late.text  # the offer is gone as the match is made
    assert "expired" in late.json()["detail"]
    apply(engine, settings, withdraw)  # ... before another applies the withdrawal: nothing more changes
    assert status(client, review_id) == "withdrawn"
    with Session(engine) as session:
        offers = session.exec(select(Outbox).where(Outbox.message_id == f"{again.id}>review.assigned")).all()
    assert offers == []  # the lapsed offer did not stand in for the new match


def test_the_worklist_puts_work_to_do_before_work_done(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    done_command, done = offered_review(engine, settings, due_in_days=1)  # due soonest, but finished
    client.post(f"/v1/reviews/{done['review_id']}/accept")
    assert (
        client.post(
            f"/v1/reviews/{done['review_id']}", json=FINDINGS, headers=specialist_headers(settings)
        ).status_code
        == 200
    )
    _, waiting = offered_review(engine, settings, due_in_days=5)
    worklist = client.get("/v1/reviews", params={"reviewer": "spec-gyn-1"}).json()
    assert [(i["review_id"], i["status"]) for i in worklist] == [
        (waiting["review_id"], "offered"),
        (done["review_id"], "submitted"),
    ]
