"""The cross-tenant matrix on intake and the partner API: partner A's key on partner B's case, FHIR Task,
webhook endpoint, keys, secret and audit export answers 404 and is audited; lists never show B's rows;
writes with unknown fields are refused by name and change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from scripts.demo import SAMPLE_CASE
from services.auth import api as partners_api
from services.auth import auth_engine
from services.auth.models import AuditEvent, Role
from services.auth.partners import create_partner, issue_key
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.intake import api, fhir_api, webhooks_out_api
from services.intake.models import Case


@dataclass
class Intake:
    client: TestClient
    intake: Engine
    auth: Engine
    a: dict[str, str]
    b: dict[str, str]
    partner_b: str
    case_b: str
    endpoint_b: str
    key_b: str


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def world(settings: Settings) -> Iterator[Intake]:
    intake, auth = make_engine("intake", settings), make_engine("auth", settings)
    migrate.upgrade("intake", intake)
    migrate.upgrade("auth", auth)
    with Session(auth) as session:
        a, b = create_partner(session, "Tenant A"), create_partner(session, "Tenant B")
        session.commit()
    routers = [api.router, fhir_api.router, partners_api.router, webhooks_out_api.router]
    app = create_app("intake", routers=routers, engine=lambda: intake)
    app.dependency_overrides[api.intake_engine] = lambda: intake
    app.dependency_overrides[auth_engine] = lambda: auth
    app.dependency_overrides[api.temporal_client] = lambda: None
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        body = {k: v for k, v in SAMPLE_CASE.items() if k != "partner_id"} | {"partner_case_ref": "B-1"}
        created = client.post("/v1/cases", json=body, headers=bearer(b.api_key))
        assert created.status_code == 201, created.text
        endpoint = client.post(
            f"/v1/partners/{b.partner_id}/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/hook"},
            headers=bearer(b.api_key),
        )
        assert endpoint.status_code == 201, endpoint.text
        keys = client.get(f"/v1/partners/{b.partner_id}", headers=bearer(b.api_key)).json()["keys"]
        yield Intake(
            client=client,
            intake=intake,
            auth=auth,
            a=bearer(a.api_key),
            b=bearer(b.api_key),
            partner_b=b.partner_id,
            case_b=created.json()["case_id"],
            endpoint_b=endpoint.json()["endpoint_id"],
            key_b=keys[0]["key_id"],
        )


def denied(auth: Engine) -> int:
    with Session(auth) as session:
        query = select(func.count()).select_from(AuditEvent).where(AuditEvent.outcome == "denied")
        return int(session.exec(query).one())


def routes(w: Intake) -> list[tuple[str, str, dict[str, Any]]]:
    c, p, e = w.case_b, w.partner_b, w.endpoint_b
    document = {
        "kind": "records_release_authorization",
        "title": "Signed records release",
        "content_type": "application/pdf",
        "content_base64": "JVBERi0xLjQK",
    }
    return [
        ("GET", f"/v1/cases/{c}", {}),
        ("POST", f"/v1/cases/{c}/cancel", {"json": {"reason": "patient withdrew"}}),
        ("POST", f"/v1/cases/{c}/documents", {"json": document}),
        ("POST", f"/v1/cases/{c}/questions", {"json": {"text": "Is MRI needed?"}}),
        ("GET", f"/fhir/Task/{c}", {}),
        ("GET", f"/v1/partners/{p}", {}),
        ("POST", f"/v1/partners/{p}/keys", {}),
        ("POST", f"/v1/partners/{p}/keys/{w.key_b}/rotate", {}),
        ("DELETE", f"/v1/partners/{p}/keys/{w.key_b}", {}),
        ("POST", f"/v1/partners/{p}/webhook-secret/rotate", {}),
        ("GET", f"/v1/partners/{p}/audit-events", {}),
        ("GET", f"/v1/partners/{p}/webhook-endpoints", {}),
        ("POST", f"/v1/partners/{p}/webhook-endpoints", {"json": {"url": "http://127.0.0.1:9/evil"}}),
        ("DELETE", f"/v1/partners/{p}/webhook-endpoints/{e}", {}),
        ("POST", f"/v1/partners/{p}/webhook-endpoints/{e}/enable", {}),
        ("GET", f"/v1/partners/{p}/webhook-endpoints/{e}/deliveries", {}),
        ("POST", f"/v1/partners/{p}/webhook-endpoints/{e}/deliveries/msg_1/replay", {}),
    ]


def test_partner_a_gets_404_and_an_audit_entry_on_every_object_of_partner_b(world: Intake) -> None:
    for method, path, kwargs in routes(world):
        before = denied(world.auth)
        response = world.client.request(method, path, headers=world.a, **kwargs)
        assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text}"
        assert denied(world.auth) > before, f"{method} {path} was not audited"
    # Partner B's objects are untouched and still B's.
    case = world.client.get(f"/v1/cases/{world.case_b}", headers=world.b)
    assert case.status_code == 200 and case.json()["status"] != "cancelled"
    assert world.client.get(f"/v1/partners/{world.partner_b}", headers=world.b).json()["keys"]


def test_a_specialist_key_sees_no_partner_and_no_case(world: Intake) -> None:
    with Session(world.auth) as session:
        key = bearer(issue_key(session, Role.SPECIALIST, None, specialist_id="spec-gyn-1").api_key)
        session.commit()
    for method, path, kwargs in routes(world):
        response = world.client.request(method, path, headers=key, **kwargs)
        assert response.status_code in (403, 404), f"{method} {path}: {response.status_code}"


def test_lists_never_include_another_partners_rows(world: Intake) -> None:
    mine = world.client.get("/v1/cases", params={"limit": 100}, headers=world.a).json()
    assert world.case_b not in [c["case_id"] for c in mine["items"]]
    filtered = world.client.get("/v1/cases", params={"partner": world.partner_b}, headers=world.a)
    assert world.case_b not in [c["case_id"] for c in filtered.json().get("items", [])]


def test_unknown_fields_are_refused_by_name_and_change_nothing(world: Intake) -> None:
    def case_row() -> tuple[Any, ...]:
        with Session(world.intake) as session:
            case = session.get(Case, world.case_b)
            assert case is not None
            return case.status, case.partner_id, case.updated_at

    body = {k: v for k, v in SAMPLE_CASE.items() if k != "partner_id"}
    writes = [
        ("/v1/cases", {**body, "partner_case_ref": "B-2", "status": "closed"}, "status"),
        (f"/v1/cases/{world.case_b}/cancel", {"reason": "patient withdrew", "status": "open"}, "status"),
        (f"/v1/cases/{world.case_b}/questions", {"text": "Is MRI needed?", "answer": "x"}, "answer"),
        ("/v1/partners", {"name": "X", "partner_id": "evil"}, "partner_id"),
        (
            f"/v1/partners/{world.partner_b}/webhook-endpoints",
            {"url": "http://127.0.0.1:9/x", "partner_id": "other"},
            "partner_id",
        ),
    ]
    for path, payload, field in writes:
        before = case_row()
        response = world.client.post(path, json=payload, headers=world.b)
        assert response.status_code in (403, 422), f"{path}: {response.status_code} {response.text}"
        if response.status_code == 422:
            assert field in [e["field"].split(".")[-1] for e in response.json()["errors"]], path
        assert case_row() == before, f"{path} changed the case"
