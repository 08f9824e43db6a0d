"""Review requests and the workflow's messages racing on the real PostgreSQL: one side is paused at the point
that matters, so each race runs the same way every time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.common.config import Settings
from services.review import followup
from services.review.directory import SpecialistCreate
from services.review.models import FollowUpQuestion
from tests.integration import test_review_flow as flow
from tests.integration.test_review_directory import new_specialist
from tests.integration.test_review_flow import apply, compose_command, submitted_review
from tests.integration.test_review_followup import question_command
from tests.integration.test_review_offers import cancelled_event
from tests.keys import specialist_headers

# The review fixtures (engine, a TestClient on the real database, tables emptied before each test).
engine, client, empty_tables = flow.engine, flow.client, flow.empty_tables


def test_an_answer_racing_the_cases_cancellation_neither_deadlocks_nor_is_overwritten(
    engine: Engine, settings: Settings, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    apply(engine, settings, question_command(case_id, "q1", "Can the repeat scan be done at our clinic?"))
    answering, go = threading.Event(), threading.Event()
    reissue = followup.reissue

    def paused(*args: Any, **kwargs: Any) -> None:
        answering.set()
        assert go.wait(10)
        reissue(*args, **kwargs)

    monkeypatch.setattr(followup, "reissue", paused)
    answers: list[Any] = []
    path = f"/v1/reviews/{review_id}/questions/q1/answer"
    signed = specialist_headers(settings)
    answer = threading.Thread(
        target=lambda: answers.append(client.post(path, json={"answer": "Yes."}, headers=signed))
    )
    answer.start()
    assert answering.wait(10)
    failures: list[BaseException] = []

    def cancel_case() -> None:
        try:
            apply(engine, settings, cancelled_event(case_id))
        except BaseException as exc:  # a deadlock, say: shown below, not lost in the thread
            failures.append(exc)

    cancel = threading.Thread(target=cancel_case)
    cancel.start()
    cancel.join(0.5)  # the cancellation reads the question while the answer is being signed
    go.set()
    answer.join(10)
    cancel.join(10)

    assert failures == []
    # The answer was signed first: it stands, and the cancellation, applied after it, leaves it answered.
    assert answers[0].status_code == 200, answers[0].text
    assert question_state(engine, case_id) == ("answered", "Yes.")


def test_a_question_of_a_cancelled_case_cannot_be_answered(
    engine: Engine, settings: Settings, client: TestClient
) -> None:
    case_id, review_id = submitted_review(engine, settings, client)
    apply(engine, settings, compose_command(case_id, review_id))
    apply(engine, settings, question_command(case_id, "q1", "Can the repeat scan be done at our clinic?"))
    apply(engine, settings, cancelled_event(case_id))

    late = client.post(
        f"/v1/reviews/{review_id}/questions/q1/answer",
        json={"answer": "Yes."},
        headers=specialist_headers(settings),
    )

    assert late.status_code == 409
    assert f"case {case_id} was cancelled at" in late.json()["detail"]
    assert question_state(engine, case_id) == ("withdrawn", None)


def question_state(engine: Engine, case_id: str) -> tuple[str, str | None]:
    with Session(engine) as session:
        question = session.get(FollowUpQuestion, ("q1", case_id))
    assert question is not None
    return question.status, question.answer


def test_the_same_specialist_added_twice_at_once_is_one_entry_and_a_409(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = new_specialist()
    both_looked = threading.Barrier(2, timeout=10)
    columns = SpecialistCreate.columns

    def after_both_looked(self: SpecialistCreate) -> dict[str, Any]:
        both_looked.wait()  # each request has found no such specialist before either adds it
        return columns(self)

    monkeypatch.setattr(SpecialistCreate, "columns", after_both_looked)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/specialists", json=entry), range(2)))

    assert client.delete(f"/v1/specialists/{entry['id']}").status_code == 200  # out of other tests' matching
    assert sorted(a.status_code for a in answers) == [201, 409]
    refused = next(a for a in answers if a.status_code == 409)
    assert refused.json()["detail"] == (
        f"specialist {entry['id']} already exists; PUT /v1/specialists/{entry['id']} updates"
    )
