"""The insurance API on the real PostgreSQL: network status, estimate, authorization, FHIR, cancellation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.coverage import Coverage as FhirCoverage
from fhir.resources.R4B.coverageeligibilityresponse import CoverageEligibilityResponse
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, Coverage, InsuranceVerified, VerifyInsurance, new_event
from contracts.events import CaseCancelled
from services.common import migrate
from services.common.config import Settings
from services.common.db import Outbox, make_engine
from services.common.http import create_app
from services.insurance import api, consumer, fhir, fhir_resources, handlers
from services.insurance.models import InsuranceMemberAccumulator
from services.insurance.settings import InsuranceSettings
from tests.keys import operations_headers
from tests.unit.test_http_body_guard import on_event_loop

D = Decimal


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

    app = create_app("insurance", routers=[api.router, fhir.router], engine=lambda: engine)
    app.dependency_overrides[api.get_session] = session
    with TestClient(app, headers=operations_headers(settings)) as client:
        yield client


def apply(engine: Engine, event: CloudEvent) -> None:
    with Session(engine) as session:
        consumer.handle(session, event)
        session.commit()


def verified_case(engine: Engine, coverage: Coverage) -> str:
    case_id = f"c-{uuid.uuid4().hex[:12]}"
    cmd = VerifyInsurance(case_id=case_id, coverage=coverage, patient_state="CA")
    apply(engine, new_event(id=f"case-{case_id}:verify-1", source="/test", data=cmd, subject=case_id))
    return case_id


def events(engine: Engine, case_id: str) -> list[CloudEvent]:
    with Session(engine) as session:
        rows = session.exec(select(Outbox).order_by(Outbox.id)).all()  # type: ignore[arg-type]
    return [e for e in (CloudEvent.model_validate_json(r.body) for r in rows) if e.subject == case_id]


@pytest.mark.parametrize(
    ("plan", "organization", "network", "source"),
    [
        ("ACME-PPO", "Hudson Women's Imaging", "in", "network table"),
        ("ACME-HMO", "Hudson Women's Imaging", "out", "network table"),
        ("acme-hmo", "Bay State Perinatal Associates", "in", "network table"),
        ("MEDIVALUE-BASIC", "Hudson Women's Imaging", "out", "plan default"),
        ("NOPE-1", "Hudson Women's Imaging", "unknown", "not on file"),
    ],
)
def test_network_status_for_the_matching_step(
    client: TestClient, plan: str, organization: str, network: str, source: str
) -> None:
    response = client.get("/v1/coverage/network", params={"plan_code": plan, "organization": organization})
    assert response.status_code == 200
    assert (response.json()["network"], response.json()["source"]) == (network, source)


def test_network_status_needs_both_parameters(client: TestClient) -> None:
    response = client.get("/v1/coverage/network", params={"plan_code": "ACME-PPO"})
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["query.organization"]


def test_estimate_shows_the_parts(engine: Engine, client: TestClient) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-PPO", member_id="ACM100200301"))
    body = client.get(f"/v1/coverage/{case_id}/estimate").json()
    parts = {
        k: D(body[k])
        for k in ("allowed_amount", "copay", "deductible", "coinsurance", "patient_share", "plan_pays")
    }
    assert parts == {
        "allowed_amount": D("212.40"),
        "copay": D("25.00"),
        "deductible": D("80.00"),
        "coinsurance": D("26.48"),
        "patient_share": D("131.48"),
        "plan_pays": D("80.92"),
    }
    assert (D(body["deductible_remaining_before"]), body["stale"], body["authorization"]) == (
        D("80.00"),
        False,
        "no-auth",
    )
    assert "ACM100200301" not in str(body)


def test_demo_plan_stays_covered_without_authorization(engine: Engine) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-PPO", member_id="W123456789"))
    [event] = events(engine, case_id)
    verified = InsuranceVerified.model_validate(event.data)
    assert (verified.coverage_status, verified.authorization, verified.network, verified.outcome) == (
        "covered",
        "no-auth",
        "in",
        "active",
    )


def test_referral_is_recorded_and_announced_as_satisfied(engine: Engine, client: TestClient) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-GATED", member_id="G1"))
    [first] = events(engine, case_id)
    assert first.data["authorization"] == "auth-needed"

    body = {"referral_document_id": "doc-77", "by": "staff-3"}
    response = client.post(f"/v1/coverage/{case_id}/authorization", json=body)
    assert response.status_code == 200
    assert response.json()["authorization"] == "satisfied"
    again = client.post(f"/v1/coverage/{case_id}/authorization", json=body)
    assert again.status_code == 200

    announced = events(engine, case_id)
    assert [e.data["authorization"] for e in announced] == ["auth-needed", "satisfied"]
    assert announced[1].id == f"{case_id}>insurance.authorized>referral:doc-77"

    # A later re-verification with the same plan keeps the authorization.
    cmd = VerifyInsurance(
        case_id=case_id, coverage=Coverage(plan_code="ACME-GATED", member_id="G2"), patient_state="CA"
    )
    apply(engine, new_event(id=f"case-{case_id}:verify-2", source="/test", data=cmd, subject=case_id))
    assert events(engine, case_id)[-1].data["authorization"] == "satisfied"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"by": "staff-3"}, 409, "send authorization_number or referral_document_id"),
        ({"authorization_number": "A 1", "by": "staff-3"}, 422, "authorization_number"),
        ({"authorization_number": "PA-123", "by": "staff-3", "patient": "x"}, 422, "patient"),
    ],
)
def test_bad_authorization_bodies(
    engine: Engine, client: TestClient, body: dict[str, Any], status: int, says: str
) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-GATED", member_id="G1"))
    response = client.post(f"/v1/coverage/{case_id}/authorization", json=body)
    assert response.status_code == status
    assert says in str(response.json())


def test_authorization_for_a_plan_that_needs_none_is_refused(engine: Engine, client: TestClient) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-PPO", member_id="X1"))
    response = client.post(
        f"/v1/coverage/{case_id}/authorization", json={"authorization_number": "PA-1", "by": "s"}
    )
    assert response.status_code == 409
    assert "needs no referral or prior authorization" in response.json()["detail"]
    unknown = client.post(
        "/v1/coverage/no-such-case/authorization", json={"authorization_number": "PA-1", "by": "s"}
    )
    assert unknown.status_code == 404


def test_cancellation_withdraws_the_case(engine: Engine, client: TestClient) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-GATED", member_id="G1"))
    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="staff-1")
    event = new_event(
        id=f"case-{case_id}:cancelled", source="/workflows/case", data=cancelled, subject=case_id
    )
    apply(engine, event)
    with Session(engine) as session:  # a redelivery without the inbox changes nothing
        consumer.handle(session, event)
        session.commit()

    assert client.get(f"/v1/coverage/{case_id}").json()["withdrawn"] is True
    response = client.post(
        f"/v1/coverage/{case_id}/authorization", json={"authorization_number": "PA-1", "by": "s"}
    )
    assert response.status_code == 409
    cmd = VerifyInsurance(case_id=case_id, coverage=Coverage(self_pay=True), patient_state="CA")
    apply(engine, new_event(id=f"case-{case_id}:verify-2", source="/test", data=cmd, subject=case_id))
    assert len(events(engine, case_id)) == 1


def test_cancellation_before_verification_is_kept(engine: Engine, client: TestClient) -> None:
    case_id = f"c-{uuid.uuid4().hex[:12]}"
    cancelled = CaseCancelled(case_id=case_id, reason="duplicate case", cancelled_by="staff-1")
    apply(engine, new_event(id=f"case-{case_id}:cancelled", source="/wf", data=cancelled, subject=case_id))
    cmd = VerifyInsurance(case_id=case_id, coverage=Coverage(self_pay=True), patient_state="CA")
    apply(engine, new_event(id=f"case-{case_id}:verify-1", source="/test", data=cmd, subject=case_id))
    assert events(engine, case_id) == []
    assert client.get(f"/v1/coverage/{case_id}").status_code == 404


def eligibility_request(plan: str = "ACME-PPO", member: str = "ACM100200300", **item: Any) -> dict[str, Any]:
    return {
        "resourceType": "CoverageEligibilityRequest",
        "id": "req-1",
        "status": "active",
        "purpose": ["benefits"],
        "patient": {"reference": "Patient/p1"},
        "created": "2026-11-28",
        "insurer": {"reference": "Organization/acme"},
        "contained": [
            {
                "resourceType": "Coverage",
                "id": "cov",
                "status": "active",
                "subscriberId": member,
                "beneficiary": {"reference": "Patient/p1"},
                "payor": [{"reference": "Organization/acme"}],
                "class": [
                    {
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                    "code": "plan",
                                }
                            ]
                        },
                        "value": plan,
                    }
                ],
            }
        ],
        "insurance": [{"coverage": {"reference": "#cov"}}],
        "item": [
            {
                "productOrService": {
                    "coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "76140"}]
                },
                **item,
            }
        ],
    }


def test_fhir_eligibility_request_gets_a_valid_response(client: TestClient) -> None:
    response = client.post("/fhir/CoverageEligibilityRequest", json=eligibility_request())
    assert response.status_code == 201  # kept: read it again at the Location (FHIR create)
    assert response.headers["content-type"].startswith("application/fhir+json")
    resource = CoverageEligibilityResponse.model_validate(response.json())
    assert (resource.outcome, resource.insurance[0].inforce) == ("complete", True)
    item = resource.insurance[0].item[0]
    assert item.authorizationRequired is False
    money = {b.type.coding[0].code: b.allowedMoney.value for b in item.benefit}
    assert money == {"benefit": D("212.40"), "copay": D("25.00"), "deductible": D("0.00")}
    assert "ACM100200300" not in response.text


def test_eligibility_is_validated_and_asked_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large resource's validation, and a payer's answer to the connector, held every other request to
    insurance while they took."""
    where: list[tuple[str, bool]] = []
    for module, name in ((fhir_resources, "read_request"), (handlers, "estimate_for")):
        real = getattr(module, name)

        def spy(*args: Any, real: Any = real, name: str = name, **kwargs: Any) -> Any:
            where.append((name, on_event_loop()))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    assert client.post("/fhir/CoverageEligibilityRequest", json=eligibility_request()).status_code == 201
    assert where == [("read_request", False), ("estimate_for", False)]


def test_fhir_eligibility_for_modifier_26(client: TestClient) -> None:
    request = eligibility_request(
        modifier=[{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "26"}]}]
    )
    request["item"][0]["productOrService"]["coding"][0]["code"] = "76856"
    resource = client.post("/fhir/CoverageEligibilityRequest", json=request).json()
    assert resource["insurance"][0]["item"][0]["benefit"][0]["allowedMoney"]["value"] == 98.5


def test_eligibility_errors_never_echo_what_was_sent(client: TestClient) -> None:
    """The Coverage reference and the CPT modifier are free text a client may fill with a patient's name."""
    unreferenced = eligibility_request()
    unreferenced["insurance"][0]["coverage"]["reference"] = "#Jane-Doe-1984-03-02"
    modified = eligibility_request(modifier=[{"coding": [{"code": "JANE DOE"}]}])
    for request in (unreferenced, modified):
        response = client.post("/fhir/CoverageEligibilityRequest", json=request)
        assert response.status_code == 422
        assert OperationOutcome.model_validate(response.json()).issue[0].expression
        assert "Jane" not in response.text and "JANE" not in response.text


@pytest.mark.parametrize(
    ("mutate", "status", "expression"),
    [
        (lambda r: r.pop("patient"), 422, "CoverageEligibilityRequest.patient"),
        (lambda r: r["item"][0].update(bogus=1), 422, "CoverageEligibilityRequest.item[0].bogus"),
        (lambda r: r.update(status="maybe"), 422, "CoverageEligibilityRequest.status"),
        (lambda r: r.pop("contained"), 422, "CoverageEligibilityRequest.insurance[0].coverage.reference"),
        (lambda r: r["contained"][0].pop("subscriberId"), 422, "Coverage.subscriberId"),
        (lambda r: r.update(resourceType="Patient"), 422, "CoverageEligibilityRequest"),
    ],
)
def test_invalid_fhir_request_is_an_operation_outcome_naming_the_element(
    client: TestClient, mutate: Any, status: int, expression: str
) -> None:
    request = eligibility_request()
    mutate(request)
    response = client.post("/fhir/CoverageEligibilityRequest", json=request)
    assert response.status_code == status
    outcome = OperationOutcome.model_validate(response.json())
    assert outcome.issue[0].expression == [expression]
    assert "ACM100200300" not in response.text


def test_fhir_request_that_is_not_json(client: TestClient) -> None:
    response = client.post("/fhir/CoverageEligibilityRequest", content=b"<xml/>")
    assert response.status_code == 400
    assert OperationOutcome.model_validate(response.json()).issue[0].code == "structure"


def nested_extension(depth: int) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(depth):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    return extension


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["contained"].append({"resourceType": "Foo", "id": "foo"}),
        lambda r: r["contained"].append({"resourceType": 5}),
        lambda r: r["contained"].append({"resourceType": ["Coverage"]}),
        lambda r: r.update(extension=[nested_extension(300)]),
    ],
    ids=["unknown contained type", "resourceType a number", "resourceType a list", "extensions 300 deep"],
)
def test_a_request_the_fhir_models_cannot_read_is_a_422_not_a_500(client: TestClient, mutate: Any) -> None:
    request = eligibility_request()
    mutate(request)
    response = client.post("/fhir/CoverageEligibilityRequest", json=request)
    assert response.status_code == 422, response.text
    outcome = OperationOutcome.model_validate(response.json())
    assert outcome.issue[0].expression == ["CoverageEligibilityRequest"]
    assert "ACM100200300" not in response.text


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 5000 + b"]" * 5000, "nests arrays or objects too deeply"),
        (
            b'{"resourceType": "CoverageEligibilityRequest", "n": ' + b"9" * 5000 + b"}",
            "more digits than can be read",
        ),
    ],
    ids=["nested too deep", "a number of 5000 digits"],
)
def test_json_that_cannot_be_read_is_a_400_saying_why_not_a_500(
    client: TestClient, body: bytes, why: str
) -> None:
    response = client.post(
        "/fhir/CoverageEligibilityRequest", content=body, headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 400
    assert why in (OperationOutcome.model_validate(response.json()).issue[0].diagnostics or "")


def test_an_xml_request_is_told_this_server_speaks_json(client: TestClient) -> None:
    response = client.post(
        "/fhir/CoverageEligibilityRequest",
        content=b"<xml/>",
        headers={"Content-Type": "application/fhir+xml"},
    )
    assert response.status_code == 415
    assert OperationOutcome.model_validate(response.json()).issue[0].code == "not-supported"


def test_case_coverage_as_fhir(engine: Engine, client: TestClient) -> None:
    case_id = verified_case(engine, Coverage(plan_code="ACME-PPO", member_id="W123456789"))
    response = client.get(f"/v1/coverage/{case_id}/Coverage")
    assert response.status_code == 200
    coverage = FhirCoverage.model_validate(response.json())
    assert (coverage.status, coverage.subscriberId, coverage.class_fhir[0].value) == (
        "active",
        "******6789",
        "ACME-PPO",
    )
    assert "W123456789" not in response.text


def test_reverification_rechecks_when_stale_or_changed(
    engine: Engine, client: TestClient, settings: Settings
) -> None:
    member = f"RV-{uuid.uuid4().hex[:6]}"
    with Session(engine) as session:
        session.add(
            InsuranceMemberAccumulator(plan_code="ACME-PPO", member_id=member, deductible_met=D("420.00"))
        )
        session.commit()
    case_id = f"c-{uuid.uuid4().hex[:12]}"

    def verify(n: int, member_id: str, max_age_hours: float) -> Decimal:
        cmd = VerifyInsurance(
            case_id=case_id, coverage=Coverage(plan_code="ACME-PPO", member_id=member_id), patient_state="CA"
        )
        with Session(engine) as session:
            handlers.verify(
                cmd,
                session,
                settings,
                event_id=f"case-{case_id}:verify-{n}",
                insurance_settings=InsuranceSettings(verification_max_age_hours=max_age_hours),
            )
            session.commit()
        return D(client.get(f"/v1/coverage/{case_id}").json()["patient_cost"])

    assert verify(1, member, 72) == D("131.48")
    with Session(engine) as session:
        accumulator = session.get(InsuranceMemberAccumulator, ("ACME-PPO", member))
        assert accumulator is not None
        accumulator.deductible_met = D("500.00")
        session.add(accumulator)
        session.commit()
    assert verify(2, member, 72) == D("131.48")  # same coverage, fresh: the recorded answer stands
    assert verify(3, member, 0) == D("67.48")  # stale: asked again
    assert verify(4, "NEW-MEMBER", 72) == D("212.40")  # coverage changed: asked again
    assert len(events(engine, case_id)) == 4
    assert client.get(f"/v1/coverage/{case_id}/estimate").json()["stale"] is False
