"""Key and secret rotations sent twice at once, on the real PostgreSQL: the first is paused once it has read
the key or secret, so each race runs the same way every time."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import api as partners_api
from services.auth import partners
from services.auth.models import Partner
from services.common.config import Settings
from services.intake import api
from tests.integration.intake_app import intake_app, intake_engines


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, partners_api.router)) as c:
        yield c


def new_partner(auth: Engine) -> partners.PartnerCredentials:
    with Session(auth) as session:
        created = partners.create_partner(session, "Racing Clinic", f"race-{uuid.uuid4().hex[:8]}")
        session.commit()
    return created


def first_paused_after_reading(
    monkeypatch: pytest.MonkeyPatch, name: str, send: Callable[[], Any]
) -> list[Any]:
    """Send twice: the first pauses in `partners.<name>` (called once it has read what it changes) while the
    second runs (or waits for it); returns both answers, the first's first."""
    read, go = threading.Event(), threading.Event()
    original = getattr(partners, name)
    calls = iter(range(2))

    def paused(*args: Any, **kwargs: Any) -> Any:
        if next(calls, None) == 0:  # the first request's call (the request runs on the server's thread)
            read.set()
            assert go.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(partners, name, paused)
    answers: dict[str, Any] = {}
    first = threading.Thread(target=lambda: answers.update(first=send()))
    first.start()
    assert read.wait(10)
    second = threading.Thread(target=lambda: answers.update(second=send()))
    second.start()
    second.join(0.5)  # the second runs now, unless it must wait for the first
    go.set()
    first.join(10)
    second.join(10)
    return [answers["first"], answers["second"]]


def test_a_key_rotated_twice_at_once_is_replaced_by_one_key(
    client: TestClient, engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two new keys for one old one would leave a working key that the caller whose answer was lost never
    saw: the second rotation is told the key is no longer active."""
    created = new_partner(engines[1])
    auth = {"Authorization": f"Bearer {created.api_key}"}
    [old] = client.get(f"/v1/partners/{created.partner_id}", headers=auth).json()["keys"]
    path = f"/v1/partners/{created.partner_id}/keys/{old['key_id']}/rotate"

    answers = first_paused_after_reading(monkeypatch, "issue_key", lambda: client.post(path, headers=auth))

    assert [a.status_code for a in answers] == [201, 404], [a.text for a in answers]
    assert "no such active key" in answers[1].json()["detail"]
    new = {"Authorization": f"Bearer {answers[0].json()['api_key']}"}
    keys = client.get(f"/v1/partners/{created.partner_id}", headers=new).json()["keys"]
    assert [k["key_id"] for k in keys] == [answers[0].json()["key_id"]]


def test_a_webhook_secret_rotated_twice_at_once_keeps_both_new_secrets_valid(
    client: TestClient, engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each caller was shown a secret: the one shown first stays valid for the overlap day, not lost."""
    created = new_partner(engines[1])
    auth = {"Authorization": f"Bearer {created.api_key}"}
    path = f"/v1/partners/{created.partner_id}/webhook-secret/rotate"

    answers = first_paused_after_reading(
        monkeypatch, "new_webhook_secret", lambda: client.post(path, headers=auth)
    )

    assert [a.status_code for a in answers] == [201, 201]
    with Session(engines[1]) as session:
        partner = session.get(Partner, created.partner_id)
        assert partner is not None
        valid = partner.webhook_secrets(datetime.now(UTC))
    assert sorted(valid) == sorted(a.json()["webhook_secret"] for a in answers)
