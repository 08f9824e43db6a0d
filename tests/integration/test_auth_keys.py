"""API keys, roles and the audit log on the real PostgreSQL, driven the way an operator and a partner do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, select

from services.auth import api as partners_api
from services.auth.models import ApiKey, AuditEvent, Role
from services.auth.partners import issue_key
from services.common.config import PROJECT_ROOT, Settings
from services.intake import api
from tests.integration.intake_app import intake_app, intake_engines


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, partners_api.router)) as c:
        yield c


def cli(*args: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "services.common.cli", *args],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def staff_key(auth: Engine, role: Role) -> str:
    with Session(auth) as session:
        issued = issue_key(
            session, role, None, specialist_id="spec-gyn-1" if role == Role.SPECIALIST else None
        )
        session.commit()
    return issued.api_key


def test_partner_create_prints_credentials_once_and_stores_only_a_hash(
    engines: tuple[Engine, Engine], client: TestClient
) -> None:
    created = cli("partner", "create", "--name", "Demo Clinic")
    assert set(created) == {"partner_id", "api_key", "webhook_secret"}
    assert created["webhook_secret"].startswith("whsec_")
    with Session(engines[1]) as session:
        stored = session.exec(select(ApiKey).where(ApiKey.partner_id == created["partner_id"])).one()
    assert created["api_key"] not in stored.key_hash and stored.key_hash != created["api_key"]
    answer = client.get(f"/v1/partners/{created['partner_id']}", headers=bearer(created["api_key"]))
    assert answer.status_code == 200
    assert created["api_key"] not in answer.text  # never shown again
    assert [k["key_id"] for k in answer.json()["keys"]] == [stored.id]


def test_chosen_partner_id_is_kept_and_not_reused() -> None:
    assert cli("partner", "create", "--name", "demo", "--partner-id", "demo-x1")["partner_id"] == "demo-x1"
    with pytest.raises(subprocess.CalledProcessError) as failed:
        cli("partner", "create", "--name", "demo", "--partner-id", "demo-x1")
    assert "exists already" in failed.value.stderr


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": "Bearer so_000000000000_" + "a" * 43},
        {"Authorization": "Basic dXNlcjpwdw=="},
    ],
)
def test_missing_or_invalid_key_is_401_and_audited(
    client: TestClient, engines: tuple[Engine, Engine], headers: dict[str, str]
) -> None:
    with Session(engines[1]) as session:
        before = len(session.exec(select(AuditEvent).where(AuditEvent.outcome == "denied")).all())
    response = client.get("/v1/cases", headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]
    with Session(engines[1]) as session:
        after = len(session.exec(select(AuditEvent).where(AuditEvent.outcome == "denied")).all())
    assert after == before + 1


def test_rotated_key_replaces_the_old_one_and_revoked_keys_stop_working(client: TestClient) -> None:
    created = cli("partner", "create", "--name", "Rotating Clinic")
    pid, old = created["partner_id"], created["api_key"]
    old_id = client.get(f"/v1/partners/{pid}", headers=bearer(old)).json()["keys"][0]["key_id"]

    rotated = client.post(f"/v1/partners/{pid}/keys/{old_id}/rotate", headers=bearer(old))
    assert rotated.status_code == 201
    new = rotated.json()["api_key"]
    assert client.get("/v1/cases", headers=bearer(old)).status_code == 401
    assert client.get("/v1/cases", headers=bearer(new)).status_code == 200

    second = client.post(f"/v1/partners/{pid}/keys", headers=bearer(new)).json()
    assert (
        client.delete(f"/v1/partners/{pid}/keys/{second['key_id']}", headers=bearer(new)).status_code == 204
    )
    assert client.get("/v1/cases", headers=bearer(second["api_key"])).status_code == 401
    assert "revoked" in client.get("/v1/cases", headers=bearer(second["api_key"])).json()["detail"]
    # The CLI rotates too.
    via_cli = cli("partner", "rotate-key", rotated.json()["key_id"])
    assert client.get("/v1/cases", headers=bearer(new)).status_code == 401
    assert client.get("/v1/cases", headers=bearer(via_cli["api_key"])).status_code == 200


def test_a_partner_cannot_see_or_touch_another_partners_keys(client: TestClient) -> None:
    a, b = cli("partner", "create", "--name", "A"), cli("partner", "create", "--name", "B")
    b_key_id = client.get(f"/v1/partners/{b['partner_id']}", headers=bearer(b["api_key"])).json()["keys"][0][
        "key_id"
    ]
    for method, path in [
        ("GET", f"/v1/partners/{b['partner_id']}"),
        ("POST", f"/v1/partners/{b['partner_id']}/keys"),
        ("POST", f"/v1/partners/{b['partner_id']}/keys/{b_key_id}/rotate"),
        ("DELETE", f"/v1/partners/{b['partner_id']}/keys/{b_key_id}"),
        ("POST", f"/v1/partners/{b['partner_id']}/webhook-secret/rotate"),
        ("GET", f"/v1/partners/{b['partner_id']}/audit-events"),
    ]:
        assert client.request(method, path, headers=bearer(a["api_key"])).status_code == 404, path
    assert client.get("/v1/cases", headers=bearer(b["api_key"])).status_code == 200


def test_roles_only_operations_registers_partners_and_specialists_have_no_case_api(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    partner = cli("partner", "create", "--name", "Role Clinic")
    ops, specialist = staff_key(engines[1], Role.OPERATIONS), staff_key(engines[1], Role.SPECIALIST)
    assert (
        client.post("/v1/partners", json={"name": "X"}, headers=bearer(partner["api_key"])).status_code == 403
    )
    made = client.post("/v1/partners", json={"name": "Made By Ops"}, headers=bearer(ops))
    assert made.status_code == 201 and made.json()["api_key"].startswith("so_")
    forbidden = client.get("/v1/cases", headers=bearer(specialist))
    assert forbidden.status_code == 403 and "operations" in forbidden.json()["detail"]


def test_audit_log_is_append_only(engines: tuple[Engine, Engine], client: TestClient) -> None:
    client.get("/v1/cases")  # one denied attempt at least
    with engines[1].connect() as conn:
        with pytest.raises(DBAPIError, match="append-only"):
            conn.execute(text("UPDATE audit_events SET outcome = 'success'"))
        conn.rollback()
        with pytest.raises(DBAPIError, match="append-only"):
            conn.execute(text("DELETE FROM audit_events"))


def test_audit_exports_as_fhir_auditevents_scoped_to_the_partner(
    client: TestClient, engines: tuple[Engine, Engine]
) -> None:
    from fhir.resources.R4B.bundle import Bundle

    from tests.integration.test_intake_api import SAMPLE

    mine, other = cli("partner", "create", "--name", "Audited"), cli("partner", "create", "--name", "Other")
    case_id = client.post("/v1/cases", json=SAMPLE, headers=bearer(mine["api_key"])).json()["case_id"]
    client.get(f"/v1/cases/{case_id}", headers=bearer(mine["api_key"]))
    exported = client.get(f"/v1/partners/{mine['partner_id']}/audit-events", headers=bearer(mine["api_key"]))
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(exported.json())
    events = [e.resource for e in bundle.entry or []]
    assert [(e.action, e.outcome) for e in events] == [("C", "0"), ("R", "0")]
    assert all(e.entity[0].what.identifier.value == case_id for e in events)
    assert "Jane" not in exported.text and "MRN-0042" not in exported.text
    foreign = client.get(f"/v1/partners/{mine['partner_id']}/audit-events", headers=bearer(other["api_key"]))
    assert foreign.status_code == 404
    ops = staff_key(engines[1], Role.OPERATIONS)
    assert (
        client.get(f"/v1/partners/{mine['partner_id']}/audit-events", headers=bearer(ops)).status_code == 200
    )


def test_the_audit_export_reads_since_as_utc_without_an_offset_and_refuses_one_utc_cannot_hold(
    client: TestClient,
) -> None:
    """`since=2026-12-01` (no offset) and a `since` whose UTC is in year 0 were 500s."""
    from tests.integration.test_intake_api import SAMPLE

    mine = cli("partner", "create", "--name", "Since")
    client.post("/v1/cases", json=SAMPLE, headers=bearer(mine["api_key"]))
    url = f"/v1/partners/{mine['partner_id']}/audit-events"
    today = datetime.now(UTC).date()
    exported = client.get(url, params={"since": today.isoformat()}, headers=bearer(mine["api_key"]))
    assert exported.status_code == 200 and len(exported.json()["entry"]) == 1
    later = client.get(
        url, params={"since": f"{today + timedelta(days=1)}T00:00"}, headers=bearer(mine["api_key"])
    )
    assert later.status_code == 200 and not later.json().get("entry")
    refused = client.get(url, params={"since": "0001-01-01T00:00:00+01:00"}, headers=bearer(mine["api_key"]))
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "query.since"


def test_webhook_secret_rotation_shows_the_new_secret_once(client: TestClient) -> None:
    created = cli("partner", "create", "--name", "Secretive")
    rotated = client.post(
        f"/v1/partners/{created['partner_id']}/webhook-secret/rotate", headers=bearer(created["api_key"])
    )
    assert rotated.status_code == 201
    assert rotated.json()["webhook_secret"].startswith("whsec_")
    assert rotated.json()["webhook_secret"] != created["webhook_secret"]
    via_cli = cli("partner", "rotate-webhook-secret", created["partner_id"])
    assert via_cli["webhook_secret"] not in (created["webhook_secret"], rotated.json()["webhook_secret"])
