"""Inbound partner webhooks on the real PostgreSQL: Standard Webhooks signatures, replay, and events."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from services.auth.keys import new_webhook_secret
from services.auth.models import AuditEvent, Partner
from services.auth.partners import rotate_webhook_secret
from services.common.config import Settings
from services.common.db import Outbox
from services.intake import api, fhir_intake, webhooks_in
from services.intake.models import Case, CaseDocument
from services.intake.webhook_signing import TOLERANCE_SECONDS, headers_for, sign
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE, new_partner
from tests.integration.test_intake_fhir import FULL
from tests.unit.test_http_body_guard import on_event_loop


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, webhooks_in.router)) as c:
        yield c


@pytest.fixture
def partner(engines: tuple[Engine, Engine]) -> dict[str, str]:
    created = new_partner(engines[1], "Webhook Clinic")
    with Session(engines[1]) as session:
        row = session.get(Partner, created["partner_id"])
        assert row is not None
        created["secret"] = row.webhook_secret
    return created


def event(kind: str, data: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "timestamp": "2026-11-28T04:00:00Z", "data": data}).encode()


def deliver(
    client: TestClient, partner: dict[str, str], body: bytes, *, secrets: list[str] | None = None,
    webhook_id: str | None = None, at: int | None = None, drop: str | None = None,
    override: dict[str, str] | None = None,
) -> Any:  # fmt: skip
    headers = headers_for(
        secrets or [partner["secret"]], webhook_id or f"msg_{uuid.uuid4().hex}", at or int(time.time()), body
    )
    headers.update(override or {})
    if drop:
        headers.pop(drop)
    return client.post(f"/webhooks/partners/{partner['partner_id']}", content=body, headers=headers)


def counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        cases = session.exec(select(func.count()).select_from(Case)).one()
        outbox = session.exec(select(func.count()).select_from(Outbox)).one()
    return cases, outbox


def test_case_requested_creates_the_case_once_however_often_it_is_replayed(
    client: TestClient, engines: tuple[Engine, Engine], partner: dict[str, str]
) -> None:
    body = event("case.requested", FULL)
    first = deliver(client, partner, body, webhook_id="msg_1")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    before = counts(engines[0])
    replay = deliver(client, partner, body, webhook_id="msg_1")
    assert replay.status_code == 200 and replay.json() == {**first.json(), "status": "duplicate"}
    assert counts(engines[0]) == before
    with Session(engines[0]) as session:
        case = session.get(Case, first.json()["case_id"])
        assert case is not None and case.partner_id == partner["partner_id"]
    other_body = deliver(client, partner, event("case.requested", {**FULL, "id": "x"}), webhook_id="msg_1")
    assert other_body.status_code == 422


def test_the_bundle_of_case_requested_is_validated_off_the_event_loop(
    client: TestClient, partner: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10 MB Bundle takes seconds to validate: on the event loop every other request to intake waited."""
    where: list[bool] = []
    real = fhir_intake.from_bundle

    def spy(bundle: Any) -> Any:
        where.append(on_event_loop())
        return real(bundle)

    monkeypatch.setattr(fhir_intake, "from_bundle", spy)
    assert deliver(client, partner, event("case.requested", FULL)).status_code == 200
    assert where == [False]


def test_rotation_any_of_several_signatures_and_the_previous_secret_for_a_day(
    client: TestClient, engines: tuple[Engine, Engine], partner: dict[str, str]
) -> None:
    body = event("case.requested", FULL)
    assert (
        deliver(client, partner, body, secrets=[new_webhook_secret(), partner["secret"]]).status_code == 200
    )
    with Session(engines[1]) as session:
        rotated = rotate_webhook_secret(session, partner["partner_id"])
        session.commit()
    assert rotated and rotated != partner["secret"]
    assert deliver(client, partner, body).status_code == 200  # signed with the previous secret
    assert deliver(client, partner, body, secrets=[rotated]).status_code == 200
    with Session(engines[1]) as session:
        row = session.get(Partner, partner["partner_id"])
        assert row is not None
        row.secret_rotated_at = datetime.now(UTC) - timedelta(hours=25)
        session.add(row)
        session.commit()
    assert deliver(client, partner, body).status_code == 401  # the overlap is over
    assert deliver(client, partner, body, secrets=[rotated]).status_code == 200


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("tampered body", 401, "no signature matches"),
        ("wrong secret", 401, "no signature matches"),
        ("stale timestamp", 400, "old"),
        ("future timestamp", 400, "ahead"),
        ("no webhook-id", 400, "webhook-id header is missing"),
        ("no webhook-timestamp", 400, "webhook-timestamp header is missing"),
        ("no webhook-signature", 400, "webhook-signature header is missing"),
        ("signature without version", 400, "v1,<base64>"),
        ("signature not base64", 400, "not base64"),
        ("only unknown versions", 400, "no v1 signature"),
        ("timestamp not a number", 400, "integer seconds"),
        ("non-UTF-8 body", 400, "UTF-8"),
        ("not an envelope", 400, "envelope"),
        ("unknown event type", 422, "not accepted"),
        ("bundle without patient", 422, "FHIR Bundle"),
        ("identifier system not a URI", 422, "FHIR Bundle"),
        # Sent without a JSON Content-Type (none here), the guard on JSON bodies never read it: a NUL in the
        # patient's name was taken into a case (200) and sent on to every service.
        ("NUL in a text", 422, "data.entry.0.resource.name.0.family holds a NUL character"),
        ("oversized body", 413, "10 MB"),
    ],
)
def test_a_rejected_delivery_is_4xx_and_changes_nothing(
    client: TestClient,
    engines: tuple[Engine, Engine],
    partner: dict[str, str],
    case: str,
    status: int,
    says: str,
) -> None:
    body = event("case.requested", FULL)
    now = int(time.time())
    sent: dict[str, Any] = {}
    if case == "tampered body":
        headers = headers_for([partner["secret"]], "msg_t", now, body)
        body = body.replace(b"Doe", b"Roe")
        sent = {"override": headers, "webhook_id": "msg_t"}
    elif case == "wrong secret":
        sent = {"secrets": [new_webhook_secret()]}
    # A minute past the tolerance either way: `now` is truncated to the second and read before the
    # request, so the server's clock is up to a second or more later (now + 301 was once accepted).
    elif case == "stale timestamp":
        sent = {"at": now - TOLERANCE_SECONDS - 60}
    elif case == "future timestamp":
        sent = {"at": now + TOLERANCE_SECONDS + 60}
    elif case.startswith("no webhook-"):
        sent = {"drop": case.removeprefix("no ")}
    elif case == "signature without version":
        sent = {"override": {"webhook-signature": "v1"}}
    elif case == "signature not base64":
        sent = {"override": {"webhook-signature": "v1,***"}}
    elif case == "only unknown versions":
        sent = {"override": {"webhook-signature": "v1a,abcd"}}
    elif case == "timestamp not a number":
        sent = {"override": {"webhook-timestamp": "yesterday"}}
    elif case == "non-UTF-8 body":
        body = b'{"type": "case.requested", "data": "\xff\xfe"}'
    elif case == "not an envelope":
        body = b'["case.requested"]'
    elif case == "unknown event type":
        body = event("case.deleted", {})
    elif case == "bundle without patient":
        body = event("case.requested", {**FULL, "entry": FULL["entry"][1:]})
    elif case == "identifier system not a URI":
        order = {**FULL["entry"][1]["resource"], "identifier": [{"system": "Jane's orders", "value": "W-1"}]}
        body = event(
            "case.requested", {**FULL, "entry": [FULL["entry"][0], {"resource": order}, *FULL["entry"][2:]]}
        )
    elif case == "oversized body":
        body = b" " * (webhooks_in.MAX_BODY_BYTES + 1)
    elif case == "NUL in a text":
        patient = {**FULL["entry"][0]["resource"], "name": [{"family": "Doe\u0000", "given": ["Jane"]}]}
        body = event("case.requested", {**FULL, "entry": [{"resource": patient}, *FULL["entry"][1:]]})
    before = counts(engines[0])
    response = deliver(client, partner, body, **sent)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]
    assert "Jane" not in response.text
    if case == "identifier system not a URI":
        [error] = response.json()["errors"]
        assert error["field"] == "data.Bundle.entry[1].resource.identifier[0].system"
    assert counts(engines[0]) == before
    if status in (400, 401, 413):
        with Session(engines[1]) as session:
            denied = session.exec(
                select(AuditEvent).where(
                    AuditEvent.partner_id == partner["partner_id"], AuditEvent.outcome == "denied"
                )
            ).all()
        assert [d.resource for d in denied] == ["webhook"]


def test_unknown_partner_is_404(client: TestClient, partner: dict[str, str]) -> None:
    body = event("case.requested", FULL)
    response = client.post(
        "/webhooks/partners/nobody-here",
        content=body,
        headers=headers_for([partner["secret"]], "m", int(time.time()), body),
    )
    assert response.status_code == 404


def test_records_available_is_published_once_and_only_for_the_partners_own_case(
    client: TestClient, engines: tuple[Engine, Engine], partner: dict[str, str]
) -> None:
    case_id = client.post(
        "/v1/cases", json=SAMPLE, headers={"Authorization": partner["Authorization"]}
    ).json()["case_id"]
    body = event("records.available", {"case_id": case_id, "study_instance_uid": "1.2.3", "note": "on PACS"})
    for _ in range(2):
        assert deliver(client, partner, body, webhook_id="msg_rec").status_code == 200
    with Session(engines[0]) as session:
        rows = session.exec(select(Outbox).where(Outbox.routing_key == "records.available")).all()
    mine = [r for r in rows if case_id.encode() in r.body]
    assert [r.message_id for r in mine] == [f"webhook:{partner['partner_id']}:msg_rec"]

    intruder = new_partner(engines[1], "Intruder")
    with Session(engines[1]) as session:
        row = session.get(Partner, intruder["partner_id"])
        assert row is not None
        intruder["secret"] = row.webhook_secret
    before = counts(engines[0])
    assert deliver(client, intruder, body).status_code == 404
    assert counts(engines[0]) == before


def test_document_added_stores_the_document(
    client: TestClient, engines: tuple[Engine, Engine], partner: dict[str, str]
) -> None:
    case_id = client.post(
        "/v1/cases",
        json=dict(SAMPLE, consent_on_file=False),
        headers={"Authorization": partner["Authorization"]},
    ).json()["case_id"]
    document = {
        "kind": "records_release_authorization",
        "title": "Signed release",
        "content_type": "application/pdf",
        "content_base64": base64.b64encode(b"%PDF-1.4").decode(),
    }
    response = deliver(client, partner, event("document.added", {"case_id": case_id, "document": document}))
    assert response.status_code == 200, response.text
    with Session(engines[0]) as session:
        assert len(session.exec(select(CaseDocument).where(CaseDocument.case_id == case_id)).all()) == 1
        stored = session.get(Case, case_id)
        assert stored is not None and stored.consent_on_file is True
    missing = deliver(client, partner, event("document.added", {"case_id": case_id}))
    assert missing.status_code == 422 and "data.document" in missing.json()["detail"]


def test_signatures_match_the_standard_webhooks_reference_vector() -> None:
    # From the Standard Webhooks specification's test vectors.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
