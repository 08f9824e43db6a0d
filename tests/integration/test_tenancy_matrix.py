"""Tenancy on every service's API, on the real PostgreSQL: partner A's key on partner B's case, record,
coverage, review and report answers 404 and leaves an audit entry; writes reject unknown fields.

One case of partner B is set up the way the system does it: `records.collect` and `review.match` through
the services' handlers (which register the case's partner and reviewer), a report uploaded by B, the
coverage decision stored, the review accepted and submitted by its specialist and the report composed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from contracts.commands import CollectRecords, ComposeReport
from contracts.envelope import new_event
from services.auth import auth_engine
from services.auth import models as auth_models
from services.auth.models import AuditEvent, Role
from services.auth.partners import create_partner, issue_key
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.insurance import api as insurance_api
from services.insurance import fhir as insurance_fhir
from services.insurance.models import CoverageVerification
from services.records import api as records_api
from services.records import dicomweb
from services.records import handlers as records_handlers
from services.records.models import RecordSource
from services.review import api as review_api
from services.review import consumer as review_consumer
from services.review import deps as review_deps
from services.review.models import Review
from services.review.models import Specialist as DirectorySpecialist
from tests.unit.test_review_matching import request as match_request

FINDINGS = {
    "technical_quality": "diagnostic",
    "agreement": "concordant",
    "findings": "Simple cyst.",
    "impression": "O-RADS 2.",
    "alternative_diagnoses": [],
    "recommendations": ["No further imaging."],
    "new_ultrasound_needed": False,
    "radpeer_score": "1",
    "patient_answers": "No surgery is needed.",
}


@dataclass
class World:
    records: TestClient
    insurance: TestClient
    review: TestClient
    auth: Engine
    keys: dict[str, str]  # a, b, ops, reviewer, other_specialist
    partner_b: str
    case_b: str
    review_b: str
    report_b: str
    file_b: str
    reviewer: str

    def as_(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


def _app(service: str, routers: list[Any], engine: Engine, auth: Engine, settings: Settings) -> TestClient:
    app = create_app(service, routers=routers, engine=lambda: engine)
    app.dependency_overrides[auth_engine] = lambda: auth
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def _key(auth: Engine, role: Role, specialist_id: str | None = None) -> str:
    with Session(auth) as session:
        issued = issue_key(session, role, None, specialist_id=specialist_id)
        session.commit()
    return issued.api_key


@pytest.fixture(scope="module")
def world(settings: Settings) -> Iterator[World]:
    get_engine.cache_clear()  # the handlers' engines must point at this session's database
    engines = {name: get_engine(name) for name in ("auth", "records", "insurance", "review")}
    for name, engine in engines.items():
        migrate.upgrade(name, engine)
    auth = engines["auth"]
    with Session(auth) as session:
        a = create_partner(session, "Clinic A")
        b = create_partner(session, "Clinic B")
        session.commit()

    case_b = str(uuid.uuid4())
    sample = match_request("pelvic", "CA")
    with Session(engines["records"], expire_on_commit=False) as session:
        collect = CollectRecords(
            case_id=case_b, patient=sample.patient, exam=sample.exam, partner_id=b.partner_id
        )
        records_handlers.collect(collect, session, settings)
        session.add(RecordSource(partner_id=b.partner_id, dicomweb_url="http://127.0.0.1:9/dicom-web"))
        session.commit()
    with Session(engines["insurance"]) as session:
        session.add(
            CoverageVerification(
                case_id=case_b,
                source_event_id=f"case-{case_b}:verify-1",
                plan_code="ACME-PPO",
                coverage_status="covered",
                cpt="76140",
                allowed_amount=Decimal("120.00"),
                patient_cost=Decimal("20.00"),
                explanation="covered after the deductible",
                authorization="auth-needed",
                authorization_rule="prior-auth",
            )
        )
        session.commit()
    match = sample.model_copy(
        update={
            "case_id": case_b,
            "partner_id": b.partner_id,
            "due_at": datetime.now(UTC) + timedelta(days=5),
        }
    )
    with Session(engines["review"], expire_on_commit=False) as session:
        event = new_event(id=f"case-{case_b}:match-1", source="/workflows", data=match, subject=case_b)
        review_consumer.handle(session, event, settings)
        session.commit()
        review = session.exec(select(Review).where(Review.case_id == case_b)).one()
        others = session.exec(
            select(DirectorySpecialist.id).where(DirectorySpecialist.id != review.reviewer_id)
        )
        other = others.first()
    assert other is not None
    keys = {
        "a": a.api_key,
        "b": b.api_key,
        "ops": _key(auth, Role.OPERATIONS),
        "reviewer": _key(auth, Role.SPECIALIST, review.reviewer_id),
        "other_specialist": _key(auth, Role.SPECIALIST, other),
    }

    records = _app("records", [records_api.router, dicomweb.router], engines["records"], auth, settings)
    insurance = _app(
        "insurance", [insurance_api.router, insurance_fhir.router], engines["insurance"], auth, settings
    )
    review_app = create_app("review", routers=[review_api.router], engine=lambda: engines["review"])
    review_app.dependency_overrides[auth_engine] = lambda: auth
    review_app.dependency_overrides[get_settings] = lambda: settings
    review_app.dependency_overrides[review_deps.review_engine] = lambda: engines["review"]
    reviews = TestClient(review_app)
    with records, insurance, reviews:
        reviewer = {"Authorization": f"Bearer {keys['reviewer']}"}
        uploaded = records.post(
            f"/v1/records/{case_b}/files",
            files=[("files", ("report.txt", b"PELVIC ULTRASOUND original report", "text/plain"))],
            headers={"Authorization": f"Bearer {keys['b']}"},
        )
        assert uploaded.status_code == 201, uploaded.text
        assert reviews.post(f"/v1/reviews/{review.id}/accept", headers=reviewer).status_code == 200
        submitted = reviews.post(f"/v1/reviews/{review.id}", json=FINDINGS, headers=reviewer)
        assert submitted.status_code == 200, submitted.text
        with Session(engines["review"], expire_on_commit=False) as session:
            compose = ComposeReport(case_id=case_b, review_id=review.id)
            event = new_event(
                id=f"case-{case_b}:compose-1", source="/workflows", data=compose, subject=case_b
            )
            review_consumer.handle(session, event, settings)
            session.commit()
        report = reviews.get(f"/v1/reports/{case_b}", headers=reviewer)
        assert report.status_code == 200, report.text
        yield World(
            records=records,
            insurance=insurance,
            review=reviews,
            auth=auth,
            keys=keys,
            partner_b=b.partner_id,
            case_b=case_b,
            review_b=review.id,
            report_b=report.json()["id"],
            file_b=uploaded.json()["files"][0]["sha256"],
            reviewer=review.reviewer_id,
        )


def denied(auth: Engine, case_id: str | None) -> int:
    with Session(auth) as session:
        query = select(func.count()).select_from(AuditEvent).where(AuditEvent.outcome == "denied")
        if case_id is not None:
            query = query.where(AuditEvent.case_id == case_id)
        return int(session.exec(query).one())


UID = "1.2.840.99999.1"


def object_routes(w: World) -> list[tuple[TestClient, str, str, dict[str, Any]]]:
    """Every route that takes an object id, aimed at partner B's objects."""
    c, files = w.case_b, {"files": ("more.txt", b"more", "text/plain")}
    return [
        (w.records, "GET", f"/v1/records/{c}", {}),
        (w.records, "POST", f"/v1/records/{c}/files", {"files": files}),
        (w.records, "GET", f"/v1/records/{c}/files/{w.file_b}", {}),
        (w.records, "GET", f"/dicomweb/cases/{c}/studies", {}),
        (w.records, "GET", f"/dicomweb/cases/{c}/studies/{UID}", {}),
        (w.records, "GET", f"/dicomweb/cases/{c}/studies/{UID}/series", {}),
        (w.records, "GET", f"/dicomweb/cases/{c}/studies/{UID}/instances", {}),
        (w.records, "GET", f"/dicomweb/cases/{c}/studies/{UID}/metadata", {}),
        (w.records, "POST", f"/dicomweb/cases/{c}/studies", {"content": b"x"}),
        (w.insurance, "GET", f"/v1/coverage/{c}", {}),
        (w.insurance, "GET", f"/v1/coverage/{c}/estimate", {}),
        (w.insurance, "GET", f"/v1/coverage/{c}/Coverage", {}),
        (
            w.insurance,
            "POST",
            f"/v1/coverage/{c}/authorization",
            {"json": {"authorization_number": "PA-1", "by": "x"}},
        ),
        (w.review, "GET", f"/v1/reports/{c}", {}),
        (w.review, "GET", f"/v1/reports/{c}/patient-summary", {}),
        (w.review, "GET", f"/fhir/DiagnosticReport/{w.report_b}", {}),
        (w.review, "GET", f"/v1/reviews/{w.review_b}", {}),
        (w.review, "POST", f"/v1/reviews/{w.review_b}/accept", {}),
        (w.review, "POST", f"/v1/reviews/{w.review_b}/decline", {"json": {"reason": "busy"}}),
        (w.review, "PUT", f"/v1/reviews/{w.review_b}/draft", {"json": {"findings": "x"}}),
        (w.review, "POST", f"/v1/reviews/{w.review_b}", {"json": FINDINGS}),
        (w.review, "POST", f"/v1/reviews/{w.review_b}/questions/q-1/answer", {"json": {"answer": "x"}}),
    ]


def test_partner_a_gets_404_and_an_audit_entry_on_every_object_of_partner_b(world: World) -> None:
    for client, method, path, kwargs in object_routes(world):
        before = denied(world.auth, world.case_b)
        response = client.request(method, path, headers=world.as_("a"), **kwargs)
        assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text}"
        assert denied(world.auth, world.case_b) == before + 1, f"{method} {path} was not audited"


@pytest.mark.parametrize("length", [37, 64, 300])
def test_a_case_id_longer_than_a_case_id_is_a_404_and_the_attempt_is_audited(
    world: World, length: int
) -> None:
    """The audit entry of the attempt could not store the id (its column holds a UUID): the INSERT failed, the
    entry was lost and the request answered 422 "cannot be stored" instead of 404."""
    long_id = "0" * length
    for client, path in (
        (world.records, f"/v1/records/{long_id}"),
        (world.records, f"/dicomweb/cases/{long_id}/studies"),
        (world.insurance, f"/v1/coverage/{long_id}"),
    ):
        before = denied(world.auth, None)
        response = client.get(path, headers=world.as_("a"))
        assert response.status_code == 404, f"{path}: {response.status_code} {response.text}"
        assert denied(world.auth, None) == before + 1, f"{path} was not audited"
        assert client.get(path, headers=world.as_("ops")).status_code in (404, 422)  # 422: the path's bound
    with Session(world.auth) as session:
        entry = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).one()
    assert entry.case_id is None and f"the case id sent is not one ({length} characters)" in entry.detail


def test_another_specialist_sees_none_of_the_case(world: World) -> None:
    for client, method, path, kwargs in object_routes(world):
        if "/coverage/" in path:
            continue  # specialists have no coverage API at all (403 below)
        response = client.request(method, path, headers=world.as_("other_specialist"), **kwargs)
        assert response.status_code == 404, f"{method} {path}: {response.status_code}"
    assert (
        world.insurance.get(f"/v1/coverage/{world.case_b}", headers=world.as_("other_specialist")).status_code
        == 404
    )
    worklist = world.review.get("/v1/reviews", headers=world.as_("other_specialist")).json()
    assert world.review_b not in [item["review_id"] for item in worklist]


def test_partner_b_the_reviewer_and_operations_see_what_is_theirs(world: World) -> None:
    w = world
    for who in ("b", "ops"):
        assert w.records.get(f"/v1/records/{w.case_b}", headers=w.as_(who)).status_code == 200
        assert w.insurance.get(f"/v1/coverage/{w.case_b}", headers=w.as_(who)).status_code == 200
        assert w.review.get(f"/v1/reports/{w.case_b}", headers=w.as_(who)).status_code == 200
        assert w.records.get(f"/v1/records/sources/{w.partner_b}", headers=w.as_(who)).status_code == 200
    assert w.records.get(f"/v1/records/{w.case_b}", headers=w.as_("reviewer")).status_code == 200
    assert w.review.get(f"/fhir/DiagnosticReport/{w.report_b}", headers=w.as_("reviewer")).status_code == 200
    # The reviewer reads the case's records but does not write them.
    upload = w.records.post(
        f"/v1/records/{w.case_b}/files",
        files={"files": ("x.txt", b"x", "text/plain")},
        headers=w.as_("reviewer"),
    )
    assert upload.status_code == 404
    worklist = w.review.get("/v1/reviews", headers=w.as_("reviewer"))
    assert [i["review_id"] for i in worklist.json() if i["case_id"] == w.case_b] == [w.review_b]
    assert w.review.get(f"/v1/reviews/{w.review_b}", headers=w.as_("reviewer")).status_code == 200
    assert (
        w.review.get("/v1/reviews", params={"reviewer": w.reviewer}, headers=w.as_("ops")).status_code == 200
    )


def test_partner_a_cannot_read_or_overwrite_partner_bs_image_source(world: World) -> None:
    w = world
    path = f"/v1/records/sources/{w.partner_b}"
    before = denied(w.auth, None)
    assert w.records.get(path, headers=w.as_("a")).status_code == 404
    hijack = w.records.put(path, json={"dicomweb_url": "http://127.0.0.1:1/evil"}, headers=w.as_("a"))
    assert hijack.status_code == 404
    assert denied(w.auth, None) == before + 2
    source = w.records.get(path, headers=w.as_("b")).json()
    assert source["dicomweb_url"] == "http://127.0.0.1:9/dicom-web"


def test_every_route_but_health_and_docs_needs_a_key(world: World) -> None:
    for client, method, path, kwargs in object_routes(world):
        assert client.request(method, path, **kwargs).status_code == 401, f"{method} {path}"
    for client, path in (
        (world.insurance, "/v1/coverage/plans"),
        (world.review, "/v1/specialists"),
        (world.review, "/v1/reviews/stats"),
        (world.review, f"/fhir/Practitioner/{world.reviewer}"),
        (world.records, f"/v1/records/sources/{world.partner_b}"),
    ):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for client in (world.records, world.insurance, world.review):
        for path in ("/healthz", "/openapi.json", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_staff_routes_need_the_staff_role(world: World) -> None:
    w = world
    assert w.review.get("/v1/reviews/stats", headers=w.as_("reviewer")).status_code == 403
    assert w.review.get("/v1/reviews", headers=w.as_("a")).status_code == 403
    assert w.review.get("/v1/specialists", headers=w.as_("a")).status_code == 403
    created = w.review.post("/v1/specialists", json={"id": "x"}, headers=w.as_("reviewer"))
    assert created.status_code == 403
    assert w.review.get("/v1/reviews/stats", headers=w.as_("ops")).status_code == 200


# Mass assignment: every write with a field the API does not take is a 422 naming it; nothing changes.
def writes(w: World) -> list[tuple[TestClient, str, str, dict[str, Any], str]]:
    return [
        (
            w.records,
            "PUT",
            f"/v1/records/sources/{w.partner_b}",
            {"dicomweb_url": "http://127.0.0.1:2/x", "partner_id": "a"},
            "b",
        ),
        (
            w.insurance,
            "POST",
            f"/v1/coverage/{w.case_b}/authorization",
            {"authorization_number": "PA-9", "by": "x", "coverage_status": "covered"},
            "b",
        ),
        (
            w.review,
            "POST",
            f"/v1/reviews/{w.review_b}/decline",
            {"reason": "busy", "reviewer_id": "x"},
            "reviewer",
        ),
        (
            w.review,
            "PUT",
            f"/v1/reviews/{w.review_b}/draft",
            {"findings": "x", "status": "accepted"},
            "reviewer",
        ),
        (
            w.review,
            "POST",
            f"/v1/reviews/{w.review_b}",
            {**FINDINGS, "submitted_at": "2020-01-01T00:00:00Z"},
            "reviewer",
        ),
        (
            w.review,
            "POST",
            f"/v1/reviews/{w.review_b}/questions/q-1/answer",
            {"answer": "x", "status": "answered"},
            "reviewer",
        ),
        (
            w.review,
            "PUT",
            f"/v1/specialists/{w.reviewer}",
            {"display_name": "X", "max_open_reviews": 99, "active": True, "is_admin": True},
            "ops",
        ),
        (
            w.review,
            "POST",
            "/v1/specialists",
            {"id": "spec-new", "display_name": "X", "is_admin": True},
            "ops",
        ),
    ]


def snapshot(w: World) -> tuple[Any, ...]:
    with Session(get_engine("records")) as session:
        source = session.get(RecordSource, w.partner_b)
        source_url = source.dicomweb_url if source else None
    with Session(get_engine("insurance")) as session:
        coverage = session.exec(
            select(CoverageVerification).where(CoverageVerification.case_id == w.case_b)
        ).one()
        coverage_state = (coverage.authorization, coverage.authorization_number)
    with Session(get_engine("review")) as session:
        review = session.get(Review, w.review_b)
        assert review is not None
        review_state = (review.status, review.draft, review.submitted_at, review.declined_at)
        specialist = session.get(DirectorySpecialist, w.reviewer)
        spec_state = specialist.model_dump() if specialist else None
        new = session.get(DirectorySpecialist, "spec-new")
    return source_url, coverage_state, review_state, spec_state, new


def test_unknown_fields_on_every_write_are_rejected_by_name_and_change_nothing(world: World) -> None:
    for client, method, path, body, who in writes(world):
        before = snapshot(world)
        response = client.request(method, path, json=body, headers=world.as_(who))
        assert response.status_code == 422, f"{method} {path}: {response.status_code} {response.text}"
        fields = [e["field"] for e in response.json()["errors"]]
        unknown = set(body) - {"dicomweb_url", "authorization_number", "by", "reason", "findings", "answer"}
        assert any(f.split(".")[-1] in unknown for f in fields), f"{path}: {fields}"
        assert snapshot(world) == before, f"{method} {path} changed a row"


def test_case_registry_is_the_partners(world: World) -> None:
    with Session(world.auth) as session:
        owner = session.get(auth_models.CaseOwner, world.case_b)
        reviewers = session.exec(
            select(auth_models.CaseReviewer.specialist_id).where(
                auth_models.CaseReviewer.case_id == world.case_b
            )
        ).all()
    assert owner is not None and owner.partner_id == world.partner_b
    assert list(reviewers) == [world.reviewer]
