"""The insurance service on the real PostgreSQL: migrations and seed, the consumer path, the API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from contracts import CloudEvent, Coverage, InsuranceVerified, VerifyInsurance, new_event
from services.common import migrate
from services.common.config import Settings
from services.common.db import Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import create_app
from services.insurance import api, consumer
from services.insurance.models import CoverageVerification, InsuranceFee, InsurancePlan
from tests.keys import operations_headers


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)
    return engine


@pytest.fixture(scope="module")
def client(engine: Engine, settings: Settings) -> Iterator[TestClient]:
    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("insurance", routers=[api.router], engine=lambda: engine)
    app.dependency_overrides[api.get_session] = session
    with TestClient(app, headers=operations_headers(settings)) as client:
        yield client


def verify_command(
    coverage: Coverage, case_id: str | None = None, event_id: str | None = None, cpt: str = "76140"
) -> CloudEvent:
    case_id = case_id or f"c-{uuid.uuid4().hex[:12]}"
    cmd = VerifyInsurance(case_id=case_id, coverage=coverage, patient_state="MA", cpt=cpt)
    return new_event(
        id=event_id or f"case-{case_id}:verify-insurance-1",
        source="/workflows/case",
        data=cmd,
        subject=case_id,
    )


def apply(engine: Engine, event: CloudEvent) -> None:
    with Session(engine) as session:
        consumer.handle(session, event)
        session.commit()


def published(engine: Engine, command: CloudEvent) -> list[CloudEvent]:
    with Session(engine) as session:
        rows = session.exec(
            select(Outbox).where(Outbox.message_id == f"{command.id}>insurance.verified")
        ).all()
    return [CloudEvent.model_validate_json(row.body) for row in rows]


def verification(engine: Engine, case_id: str) -> CoverageVerification | None:
    with Session(engine) as session:
        return session.exec(
            select(CoverageVerification).where(CoverageVerification.case_id == case_id)
        ).first()


def test_migrations_seed_plans_fees_and_accumulators(engine: Engine) -> None:
    migrate.upgrade("insurance", engine)  # a second run at start-up changes nothing
    with Session(engine) as session:
        plans = {p.code: p for p in session.exec(select(InsurancePlan)).all()}
        self_pay = session.exec(select(InsuranceFee).where(InsuranceFee.plan_code.is_(None))).all()  # type: ignore[union-attr]
    assert set(plans) == {
        "ACME-PPO",
        "ACME-HMO",
        "BLUE-HDHP",
        "MEDIVALUE-BASIC",
        "OLDPLAN",
        "SBX-PPO",
        "SBX-EPO",
        "ACME-GATED",
    }
    assert (plans["ACME-GATED"].authorization_rule, plans["SBX-PPO"].payer_id) == ("referral", "SBX01")
    assert plans["ACME-PPO"].coinsurance_pct == Decimal("0.2000")
    assert not plans["OLDPLAN"].active
    assert not plans["MEDIVALUE-BASIC"].covers_second_opinion
    assert ("76140", Decimal("350.00")) in [(f.cpt, f.allowed_amount) for f in self_pay]
    assert ("76856-26", Decimal("180.00")) in [(f.cpt, f.allowed_amount) for f in self_pay]


def test_migrations_work_on_sqlite(tmp_path: Path) -> None:
    sqlite = make_engine("insurance", Settings(data_dir=tmp_path, database_url=None))
    migrate.upgrade("insurance", sqlite)
    with Session(sqlite) as session:
        assert session.exec(select(func.count()).select_from(InsurancePlan)).one() == 8


@pytest.mark.parametrize(
    ("coverage", "status", "plan_code", "allowed", "cost"),
    [
        (Coverage(plan_code="ACME-PPO", member_id="ACM100200300"), "covered", "ACME-PPO", "212.40", "67.48"),
        (Coverage(plan_code="ACME-PPO", member_id="ACM100200301"), "covered", "ACME-PPO", "212.40", "131.48"),
        (Coverage(plan_code="acme-ppo", member_id="NEW-MEMBER"), "covered", "ACME-PPO", "212.40", "212.40"),
        (Coverage(plan_code="ACME-HMO", member_id="H1"), "covered", "ACME-HMO", "185.00", "40.00"),
        (Coverage(plan_code="BLUE-HDHP", member_id="BLU7780042"), "covered", "BLUE-HDHP", "238.75", "23.88"),
        (
            Coverage(plan_code="MEDIVALUE-BASIC", member_id="X"),
            "not_covered",
            "MEDIVALUE-BASIC",
            "350.00",
            "350.00",
        ),
        (Coverage(plan_code="OLDPLAN", member_id="X"), "not_covered", "OLDPLAN", "350.00", "350.00"),
        (Coverage(plan_code="NOPE-1", member_id="X"), "not_covered", "NOPE-1", "350.00", "350.00"),
        (Coverage(self_pay=True), "self_pay", None, "350.00", "350.00"),
    ],
)
def test_verify_records_and_queues_insurance_verified(
    engine: Engine,
    client: TestClient,
    coverage: Coverage,
    status: str,
    plan_code: str | None,
    allowed: str,
    cost: str,
) -> None:
    command = verify_command(coverage)
    apply(engine, command)

    [event] = published(engine, command)
    assert (event.type, event.subject, event.source) == (
        "insurance.verified",
        command.subject,
        "/services/insurance",
    )
    verified = InsuranceVerified.model_validate(event.data)
    assert verified.case_id == command.subject
    assert (verified.coverage_status, verified.plan_code, verified.cpt) == (status, plan_code, "76140")
    assert (verified.allowed_amount, verified.patient_cost) == (Decimal(allowed), Decimal(cost))
    assert verified.explanation

    body = client.get(f"/v1/coverage/{command.subject}").json()
    assert body["coverage_status"] == status
    assert Decimal(body["patient_cost"]) == Decimal(cost)
    assert body["explanation"] == verified.explanation
    assert "member_id" not in body
    assert coverage.member_id is None or coverage.member_id not in str(body)


def test_unknown_plan_event_offers_self_pay(engine: Engine) -> None:
    command = verify_command(Coverage(plan_code="NOPE-1", member_id="X"))
    apply(engine, command)
    [event] = published(engine, command)
    assert event.data["explanation"] == (
        "plan code NOPE-1 is not known to us; the patient can choose self-pay at $350.00"
    )


def test_repeated_command_keeps_one_row_and_one_event(engine: Engine) -> None:
    command = verify_command(Coverage(plan_code="ACME-HMO", member_id="H1"))
    for _ in range(2):  # the handler alone, without the inbox that normally drops the repeat
        with Session(engine) as session:
            consumer.handle(session, command)
            session.commit()
    assert len(published(engine, command)) == 1
    with Session(engine) as session:
        rows = session.exec(
            select(CoverageVerification).where(CoverageVerification.case_id == command.subject)
        )
        assert len(rows.all()) == 1


def test_a_new_command_for_the_case_replaces_the_decision(engine: Engine) -> None:
    first = verify_command(Coverage(plan_code="ACME-HMO", member_id="H1"))
    apply(engine, first)
    second = verify_command(Coverage(self_pay=True), case_id=first.subject, event_id=f"{first.id}-retry")
    apply(engine, second)

    row = verification(engine, first.subject)
    assert row is not None
    assert (row.coverage_status, row.patient_cost, row.source_event_id) == (
        "self_pay",
        Decimal("350.00"),
        second.id,
    )
    assert len(published(engine, first)) == 1
    assert published(engine, second)[0].data["coverage_status"] == "self_pay"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (
            verify_command(Coverage(self_pay=True)).model_copy(update={"data": {"case_id": "c-1"}}),
            "insurance.verify data is invalid (coverage: Field required; patient_state: Field required)",
        ),
        (
            verify_command(Coverage(self_pay=True)).model_copy(update={"type": "insurance.cancel"}),
            "the insurance service handles only insurance.verify and case.cancelled, not insurance.cancel",
        ),
        (
            verify_command(Coverage(self_pay=True), case_id="c-2").model_copy(update={"subject": "c-3"}),
            "insurance.verify subject c-3 does not match data.case_id c-2",
        ),
        (verify_command(Coverage(self_pay=True), cpt="99999"), "CPT 99999 has no self-pay price"),
    ],
)
def test_unusable_commands_are_poison_and_change_nothing(
    engine: Engine, event: CloudEvent, reason: str
) -> None:
    with Session(engine) as session, pytest.raises(PoisonMessage) as raised:
        consumer.handle(session, event)
    assert str(raised.value).startswith(reason)
    assert published(engine, event) == []
    assert verification(engine, event.data.get("case_id", "")) is None


def test_member_ids_are_not_echoed_in_poison_reasons(engine: Engine) -> None:
    event = verify_command(Coverage(self_pay=True))
    event.data["coverage"] = {"plan_code": "ACME-PPO", "member_id": "SECRET-ID-" + "9" * 60}
    with Session(engine) as session, pytest.raises(PoisonMessage) as raised:
        consumer.handle(session, event)
    assert "coverage.member_id" in str(raised.value)
    assert "SECRET" not in str(raised.value)


def test_plans_are_public_without_member_data(client: TestClient) -> None:
    response = client.get("/v1/coverage/plans")
    assert response.status_code == 200
    plans = {p["code"]: p for p in response.json()}
    assert set(plans) == {
        "ACME-PPO",
        "ACME-HMO",
        "BLUE-HDHP",
        "MEDIVALUE-BASIC",
        "SBX-PPO",
        "SBX-EPO",
        "ACME-GATED",
    }
    assert plans["ACME-PPO"] == {
        "code": "ACME-PPO",
        "payer_name": "Acme Health",
        "plan_name": "Acme Choice PPO",
        "active": True,
        "covers_second_opinion": True,
        "copay": "25.00",
        "coinsurance_pct": "0.2000",
        "deductible": "500.00",
        "network": "in",
    }
    everything = client.get("/v1/coverage/plans", params={"include_inactive": "true"}).json()
    assert "OLDPLAN" in {p["code"] for p in everything}


def test_unverified_case_is_a_404_that_says_why(client: TestClient) -> None:
    response = client.get("/v1/coverage/no-such-case")
    assert response.status_code == 404
    assert "no coverage verification for this case" in response.json()["detail"]
