"""`Idempotency-Key` on the real PostgreSQL: replays, conflicting reuse, and a race of ten identical POSTs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.common.config import Settings
from services.intake import api, idempotency
from services.intake.models import Case, CaseDocument, IdempotencyRecord
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router)) as c:
        yield c


def cases_of(engine: Engine, partner_id: str) -> list[Case]:
    with Session(engine) as session:
        return list(session.exec(select(Case).where(Case.partner_id == partner_id)).all())


def test_ten_concurrent_identical_posts_make_one_case(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    partner = new_partner(engines[1], "Racer")
    headers = {"Authorization": partner["Authorization"], "Idempotency-Key": str(uuid.uuid4())}
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/cases", json=SAMPLE, headers=headers), range(10)))
    assert [a.status_code for a in answers] == [201] * 10
    assert len({a.json()["case_id"] for a in answers}) == 1
    assert len(cases_of(engines[0], partner["partner_id"])) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 9


def test_same_key_same_body_returns_the_first_answer_and_another_body_is_422(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    partner = new_partner(engines[1], "Retrier")
    headers = {"Authorization": partner["Authorization"], "Idempotency-Key": "order-1"}
    first = client.post("/v1/cases", json=SAMPLE, headers=headers)
    again = client.post("/v1/cases", json=SAMPLE, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    changed = client.post(
        "/v1/cases", json=dict(SAMPLE, clinical_question="Another question?"), headers=headers
    )
    assert changed.status_code == 422
    assert "different request" in changed.json()["detail"]
    assert len(cases_of(engines[0], partner["partner_id"])) == 1


def test_keys_belong_to_one_partner(client: TestClient, engines: tuple[Engine, Engine]) -> None:
    a, b = new_partner(engines[1], "Key A"), new_partner(engines[1], "Key B")
    shared = "same-key-different-partners"
    first = client.post(
        "/v1/cases", json=SAMPLE, headers={"Authorization": a["Authorization"], "Idempotency-Key": shared}
    )
    second = client.post(
        "/v1/cases", json=SAMPLE, headers={"Authorization": b["Authorization"], "Idempotency-Key": shared}
    )
    assert first.json()["case_id"] != second.json()["case_id"]
    assert second.json()["partner_id"] == b["partner_id"]


def test_a_failed_request_releases_its_key_and_document_posts_are_idempotent(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    partner = new_partner(engines[1], "Doc Sender")
    auth = {"Authorization": partner["Authorization"]}
    refused = client.post(
        "/v1/cases",
        json=dict(SAMPLE, procedure_scheduled_on="2020-01-01"),
        headers={**auth, "Idempotency-Key": "k1"},
    )
    assert refused.status_code == 422
    assert client.post("/v1/cases", json=SAMPLE, headers={**auth, "Idempotency-Key": "k2"}).status_code == 201

    case_id = cases_of(engines[0], partner["partner_id"])[0].id
    note = {
        "kind": "clinical_note",
        "title": "note",
        "content_type": "text/plain",
        "content_base64": "aGVsbG8=",
    }
    headers = {**auth, "Idempotency-Key": "doc-1"}
    answers = [client.post(f"/v1/cases/{case_id}/documents", json=note, headers=headers) for _ in range(3)]
    assert {a.json()["document_id"] for a in answers} == {answers[0].json()["document_id"]}
    with Session(engines[0]) as session:
        assert len(session.exec(select(CaseDocument).where(CaseDocument.case_id == case_id)).all()) == 1


def test_an_empty_idempotency_key_is_422(client: TestClient, engines: tuple[Engine, Engine]) -> None:
    partner = new_partner(engines[1], "Empty Key")
    response = client.post(
        "/v1/cases", json=SAMPLE, headers={"Authorization": partner["Authorization"], "Idempotency-Key": ""}
    )
    assert response.status_code == 422
    assert "Idempotency-Key" in str(response.json()["errors"])


def test_answers_are_kept_at_least_three_days_then_purged(engines: tuple[Engine, Engine]) -> None:
    now = datetime.now(UTC)
    with Session(engines[0]) as session:
        for key, age in (("old", timedelta(days=8)), ("recent", timedelta(days=3, hours=1))):
            session.add(
                IdempotencyRecord(
                    owner="purge-test",
                    key=key,
                    fingerprint="f",
                    status_code=200,
                    response_json="{}",
                    created_at=now - age,
                )
            )
        session.commit()
    idempotency.purge(engines[0], now)
    with Session(engines[0]) as session:
        assert session.get(IdempotencyRecord, ("purge-test", "old")) is None
        assert session.get(IdempotencyRecord, ("purge-test", "recent")) is not None


def test_a_stale_claim_is_taken_over_by_one_of_two_retries_that_find_it_together(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request died holding its key; two retries read its claim at the same moment. One takes it over and
    runs, the other waits for its answer: never both run (two cases), never a 500."""
    owner, key = "stale-test", str(uuid.uuid4())
    with Session(engines[0]) as session:
        created_at = datetime.now(UTC) - idempotency.STALE_AFTER - timedelta(seconds=5)
        session.add(IdempotencyRecord(owner=owner, key=key, fingerprint="f", created_at=created_at))
        session.commit()
    both_read, first_claimed = threading.Barrier(2, timeout=10), threading.Event()
    readers = iter(range(2))

    class ReadTogether(Session):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            row = super().get(*args, **kwargs)
            reader = next(readers, None)
            if reader is not None:
                both_read.wait()  # each retry has read the stale claim before either acts on it
            if reader == 1:
                assert first_claimed.wait(10)  # the second acts on what it read once the first runs
            return row

    monkeypatch.setattr(idempotency, "Session", ReadTogether)
    with ThreadPoolExecutor(max_workers=2) as pool:
        claims = [pool.submit(idempotency.claim, engines[0], owner, key, "f") for _ in range(2)]
        done, _ = wait(claims, timeout=10, return_when=FIRST_COMPLETED)
        assert done.pop().result() is None  # it owns the key and runs
        first_claimed.set()
        time.sleep(0.2)
        idempotency.complete(engines[0], owner, key, 201, {"case_id": "c1"})
        results = [c.result(timeout=10) for c in claims]
    assert sorted(results, key=str) == [None, idempotency.StoredAnswer(201, {"case_id": "c1"})]
