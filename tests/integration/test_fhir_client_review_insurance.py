"""The FHIR routes review and insurance serve at the public base (DiagnosticReport, CoverageEligibilityRequest) as
a hospital's integration meets them: through a FHIR client library (fhirpy) against each service served over
HTTP, checked against intake's CapabilityStatement and docs/partners.md; and a body that cannot be parsed, a 400
on every FHIR route that takes one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
import uvicorn
from fastapi import FastAPI
from fhir.resources.R4B.coverageeligibilityresponse import CoverageEligibilityResponse
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, ResourceNotFound
from fhirpy.base.exceptions import OperationOutcome as OutcomeRaised
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Inbox, Outbox, make_engine
from services.common.http import create_app
from services.insurance import api as insurance_api
from services.insurance import fhir as insurance_fhir
from services.review import api as review_api
from services.review import deps as review_deps
from services.review.models import FollowUpQuestion, Report, Review, ReviewAddendum
from tests.infra import free_port
from tests.integration.test_insurance_api import eligibility_request
from tests.integration.test_intake_fhir import contained_request
from tests.integration.test_intake_fhir_client import Served, outcome_of, served
from tests.integration.test_review_flow import apply, compose_command, submitted_review
from tests.integration.test_review_followup import question_command
from tests.keys import operations_headers, specialist_headers

__all__ = ["served"]  # intake served over HTTP (its module's fixture), for the 400 below


@contextmanager
def over_http(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port; yields its root URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def review_engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine("review", settings)
    migrate.upgrade("review", engine)
    with engine.begin() as conn:  # other modules' reviews would count against the specialists' load
        for table in (FollowUpQuestion, ReviewAddendum, Report, Review, Outbox, Inbox):
            conn.execute(delete(table))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def review(review_engine: Engine, settings: Settings) -> Iterator[str]:
    """Review's routes over HTTP; yields the root URL."""
    app = create_app("review", routers=[review_api.router], engine=lambda: review_engine)
    app.dependency_overrides[review_deps.review_engine] = lambda: review_engine
    app.dependency_overrides[get_settings] = lambda: settings
    with over_http(app) as root:
        yield root


@pytest.fixture(scope="module")
def insurance(settings: Settings) -> Iterator[str]:
    """Insurance's routes over HTTP; yields the root URL."""
    engine = make_engine("insurance", settings)
    migrate.upgrade("insurance", engine)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "insurance", routers=[insurance_api.router, insurance_fhir.router], engine=lambda: engine
    )
    app.dependency_overrides[insurance_api.get_session] = session
    with over_http(app) as root:
        yield root
    engine.dispose()


def fhir_client(root: str, settings: Settings, **headers: str) -> SyncFHIRClient:
    key = operations_headers(settings)["Authorization"]
    return SyncFHIRClient(f"{root}/fhir", authorization=key, extra_headers=headers or None)


class ReviewClient:
    """Review's JSON API as the tests' helpers call it (submitted_review: post(path, json=, headers=))."""

    def __init__(self, root: str, settings: Settings) -> None:
        self.root, self.headers = root, operations_headers(settings)

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(self.root + path, json=json, headers=headers or self.headers, timeout=10)


def composed(review_engine: Engine, settings: Settings, review: str) -> tuple[str, str, str]:
    """A composed report: (report id, case id, review id)."""
    case_id, review_id = submitted_review(review_engine, settings, ReviewClient(review, settings))  # type: ignore[arg-type]
    apply(review_engine, settings, compose_command(case_id, review_id))
    with Session(review_engine) as session:
        report = session.exec(select(Report).where(Report.case_id == case_id)).one()
    return report.id, case_id, review_id


@pytest.fixture(scope="module")
def report_id(review_engine: Engine, settings: Settings, review: str) -> tuple[str, str, str]:
    """A composed report the tests below only read."""
    return composed(review_engine, settings, review)


def test_the_report_is_read_by_its_version_and_each_addendum_is_a_new_one(
    review_engine: Engine, settings: Settings, review: str
) -> None:
    """The DiagnosticReport (declared versioned) ignored If-None-Match: a partner polling it for an addendum
    (fhirpy's refresh() sends meta.versionId) read the whole report every time."""
    report, case_id, review_id = composed(review_engine, settings, review)
    client = fhir_client(review, settings)
    resource = client.reference("DiagnosticReport", report).to_resource()
    first = DiagnosticReport.model_validate(dict(resource))
    assert (first.status, first.meta.versionId) == ("final", "1")
    headers = {**operations_headers(settings), "If-None-Match": 'W/"1"'}
    unchanged = requests.get(f"{review}/fhir/DiagnosticReport/{report}", headers=headers, timeout=10)
    assert (unchanged.status_code, unchanged.content, unchanged.headers["ETag"]) == (304, b"", 'W/"1"')
    resource.refresh()  # a 304: kept as it is
    assert resource["meta"]["versionId"] == "1"

    # The referring physician's follow-up question, answered: an addendum, a new version.
    apply(review_engine, settings, question_command(case_id, "q1", "Can the repeat scan be done here?"))
    signed = specialist_headers(settings)
    answered = requests.post(f"{review}/v1/reviews/{review_id}/questions/q1/answer",
                             json={"answer": "Yes, with cine sweeps."}, headers=signed, timeout=10)  # fmt: skip
    assert answered.status_code == 200, answered.text
    resource.refresh()
    second = DiagnosticReport.model_validate(dict(resource))
    assert (second.status, second.meta.versionId) == ("appended", "2")
    stale = requests.get(f"{review}/fhir/DiagnosticReport/{report}", headers=headers, timeout=10)
    assert (stale.status_code, stale.headers["ETag"]) == (200, 'W/"2"')

    # The specialist's own addendum: another version, the row's version and the resource's agree.
    own = requests.post(f"{review}/v1/reviews/{review_id}/addenda", headers=signed, timeout=10,
                        json={"kind": "additional_finding", "text": "Small free fluid, physiological."})  # fmt: skip
    assert own.status_code in (200, 201), own.text
    resource.refresh()
    assert (resource["status"], resource["meta"]["versionId"]) == ("appended", "3")
    with Session(review_engine) as session:
        stored = session.get(Report, report)
        assert stored is not None and str(stored.version) == resource["meta"]["versionId"]


@pytest.mark.parametrize(
    "ask",
    [
        lambda c, report: c.execute(f"DiagnosticReport/{report}/_history", method="get"),  # history
        lambda c, report: c.execute(f"DiagnosticReport/{report}/_history/1", method="get"),  # vread
        lambda c, report: c.delete("DiagnosticReport", report),
        lambda c, report: c.execute("DiagnosticReport", data={"resourceType": "DiagnosticReport"}),  # create
    ],
    ids=["history", "vread", "delete", "create"],
)
def test_an_interaction_review_does_not_serve_is_a_405_saying_what_is(
    settings: Settings, review: str, report_id: tuple[str, str, str], ask: Any
) -> None:
    """Review answered these "Not Found" or "Method Not Allowed" and nothing else: a client took a history or
    a vread for "no such report" (fhirpy raises ResourceNotFound)."""
    report, _, _ = report_id
    with pytest.raises(OutcomeRaised) as raised:
        ask(fhir_client(review, settings), report)
    assert not isinstance(raised.value, ResourceNotFound)
    [issue] = outcome_of(raised.value).issue
    assert issue.code == "not-supported"
    assert "DiagnosticReport supports read (GET [base]/DiagnosticReport/{id})" in (issue.diagnostics or "")
    put = requests.put(f"{review}/fhir/DiagnosticReport/{report}", json={}, headers=operations_headers(settings),
                       timeout=10)  # fmt: skip
    assert (put.status_code, put.headers["Allow"]) == (405, "GET, HEAD")


def test_review_names_what_the_base_serves_and_that_practitioners_are_internal(
    settings: Settings, review: str
) -> None:
    """A type review does not serve (or one another service serves) was "Not Found" alone; the Practitioner
    views, which the ingress does not route, said nothing of where they are read."""
    client = fhir_client(review, settings)
    with pytest.raises(ResourceNotFound) as unknown:
        client.resources("Patient").search(name="Jane").fetch()
    [issue] = outcome_of(unknown.value).issue
    assert "DiagnosticReport (read, search-type)" in (issue.diagnostics or "")
    assert "Jane" not in (issue.diagnostics or "")
    with pytest.raises(ResourceNotFound) as elsewhere:
        client.get("Task", "t-1")
    assert "served by the intake service" in (outcome_of(elsewhere.value).issue[0].diagnostics or "")
    with pytest.raises(OutcomeRaised) as search:
        client.resources("Practitioner").search(name="Marquez").fetch()
    assert "own port only (internal" in (outcome_of(search.value).issue[0].diagnostics or "")
    assert client.get("Practitioner", "spec-gyn-1")["resourceType"] == "Practitioner"
    with pytest.raises(ResourceNotFound) as metadata:  # the ingress sends [base]/metadata to intake
        client.execute("metadata", method="get")
    assert "served by intake" in (outcome_of(metadata.value).issue[0].diagnostics or "")


def test_eligibility_is_asked_through_a_client_and_prefer_is_honoured(
    settings: Settings, insurance: str
) -> None:
    """`Prefer: return=minimal` and `return=OperationOutcome` were answered with the whole response, as intake
    answers them no more (FHIR R4 http.html#ops)."""
    answer = fhir_client(insurance, settings).execute(
        "CoverageEligibilityRequest", data=eligibility_request()
    )
    response = CoverageEligibilityResponse.model_validate(dict(answer))
    assert response.outcome == "complete" and response.insurance[0].inforce is True
    minimal = requests.post(f"{insurance}/fhir/CoverageEligibilityRequest", json=eligibility_request(),
                            headers={**operations_headers(settings), "Prefer": "return=minimal"}, timeout=10)  # fmt: skip
    assert (minimal.status_code, minimal.content) == (201, b"")
    assert minimal.headers["Preference-Applied"] == "return=minimal"
    done = fhir_client(insurance, settings, Prefer="return=OperationOutcome").execute(
        "CoverageEligibilityRequest", data=eligibility_request()
    )
    [issue] = OperationOutcome.model_validate(dict(done)).issue
    assert (issue.severity, issue.code) == ("information", "informational")
    assert "outcome complete; the coverage is in force" in (issue.diagnostics or "")
    assert "ACM100200300" not in (issue.diagnostics or "")


def test_an_eligibility_interaction_not_served_is_a_405_saying_what_is(
    settings: Settings, insurance: str
) -> None:
    """Insurance answered a search of CoverageEligibilityRequest "Method Not Allowed" without saying what is."""
    with pytest.raises(OutcomeRaised) as raised:
        fhir_client(insurance, settings).resources("CoverageEligibilityRequest").search(patient="p1").fetch()
    assert not isinstance(raised.value, ResourceNotFound)
    [issue] = outcome_of(raised.value).issue
    assert issue.code == "not-supported"
    assert "CoverageEligibilityRequest supports create (POST [base]/CoverageEligibilityRequest)" in (
        issue.diagnostics or ""
    )
    for kept in (
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
    ):  # both kept: these are not there
        with pytest.raises(ResourceNotFound) as missing:
            fhir_client(insurance, settings).get(kept, "r-1")
        assert outcome_of(missing.value).issue[0].code == "not-found"


@pytest.mark.parametrize(
    "body",
    [b'{"resourceType": "Bundle", ', b"\xff\xfe not UTF-8", b"[" * 5000 + b"]" * 5000],
    ids=["truncated", "not UTF-8", "nested too deep"],
)
def test_a_body_that_cannot_be_parsed_is_a_400_everywhere_and_a_broken_rule_a_422(
    settings: Settings, served: Served, insurance: str, body: bytes
) -> None:
    """FHIR R4 http.html: 400 for a resource that could not be parsed, 422 for one that breaks a rule. Intake
    answered an unparseable body 422 (insurance 400): a client could not tell "fix the JSON" from "fix the
    element"."""
    sent = {"Content-Type": "application/fhir+json"}
    targets = [
        (f"{served.base}/ServiceRequest", served.authorization),
        (f"{served.base}", served.authorization),
        (f"{insurance}/fhir/CoverageEligibilityRequest", operations_headers(settings)["Authorization"]),
    ]
    for url, key in targets:
        answer = requests.post(url, data=body, headers={**sent, "Authorization": key}, timeout=10)
        assert answer.status_code == 400, (url, answer.text)
        [issue] = OperationOutcome.model_validate(answer.json()).issue
        assert issue.code == "structure" and "nothing was stored" in (issue.diagnostics or "")
    broken = contained_request(f"PARSED-{len(body)}") | {"intent": "wish"}
    rule = requests.post(f"{served.base}/ServiceRequest", json=broken, timeout=10,
                         headers={**sent, "Authorization": served.authorization})  # fmt: skip
    assert rule.status_code == 422
    assert OperationOutcome.model_validate(rule.json()).issue[0].expression == ["ServiceRequest.intent"]


def test_a_request_without_a_key_is_told_so_in_an_operation_outcome(
    settings: Settings, review: str, insurance: str, report_id: tuple[str, str, str]
) -> None:
    """Review's and insurance's FHIR routes answered a missing or wrong key (401, with WWW-Authenticate) as
    application/problem+json: a FHIR client parses every error body as an OperationOutcome."""
    for root, ask in (
        (review, lambda c: c.get("DiagnosticReport", report_id[0])),
        (insurance, lambda c: c.execute("CoverageEligibilityRequest", data=eligibility_request())),
    ):
        client = SyncFHIRClient(f"{root}/fhir", authorization="Bearer so_not-a-key")
        with pytest.raises(AuthorizationError) as refused:
            ask(client)
        [issue] = OperationOutcome.model_validate_json(str(refused.value)).issue
        assert issue.code == "login", root


def test_an_order_larger_than_intake_takes_is_a_413(served: Served) -> None:
    """A body past intake's 30 MB for FHIR was a 422 "invalid", as if an element were wrong: it is too large."""
    body = b'{"resourceType": "ServiceRequest", "note": [{"text": "' + b"x" * (30 * 1024 * 1024) + b'"}]}'
    answer = requests.post(f"{served.base}/ServiceRequest", data=body, timeout=30,
                           headers={"Authorization": served.authorization, "Content-Type": "application/fhir+json"})  # fmt: skip
    assert answer.status_code == 413
    [issue] = OperationOutcome.model_validate(answer.json()).issue
    assert issue.code == "too-costly" and "30 MB" in (issue.diagnostics or "")


def test_an_eligibility_ask_breaking_a_rule_says_which_kind_of_rule(
    settings: Settings, insurance: str
) -> None:
    """Every 422 of insurance said "invalid": a CPT code it does not price (a business rule of ours, FHIR
    `business-rule`) and a member id longer than it takes (`too-long`) read as a malformed resource."""
    unpriced = eligibility_request()
    unpriced["item"][0]["productOrService"]["coding"][0]["code"] = "99999"
    too_long = eligibility_request(member="W" * 60)
    for sent, code in ((unpriced, "business-rule"), (too_long, "too-long")):
        with pytest.raises(OutcomeRaised) as refused:
            fhir_client(insurance, settings).execute("CoverageEligibilityRequest", data=sent)
        [issue] = outcome_of(refused.value).issue
        assert issue.code == code and "W" * 60 not in (issue.diagnostics or "")


def test_review_and_insurance_speak_fhir_r4_json_only_as_intake_does(
    settings: Settings, review: str, insurance: str, report_id: tuple[str, str, str]
) -> None:
    """FHIR R4 http.html#mime-type and #version-parameter, as intake answers them: XML or FHIR 5.0 asked is a
    406, sent a 415, each an OperationOutcome saying what to send."""
    report = report_id[0]
    r5 = fhir_client(review, settings, Accept="application/fhir+json; fhirVersion=5.0")
    with pytest.raises(OutcomeRaised) as asked:
        r5.get("DiagnosticReport", report)
    assert "fhirVersion=4.0" in (outcome_of(asked.value).issue[0].diagnostics or "")
    with pytest.raises(OutcomeRaised) as xml:
        fhir_client(review, settings).execute(
            f"DiagnosticReport/{report}", method="get", params={"_format": "xml"}
        )
    assert outcome_of(xml.value).issue[0].code == "not-supported"
    r4 = fhir_client(review, settings, Accept="application/fhir+json; fhirVersion=4.0")
    assert r4.get("DiagnosticReport", report)["id"] == report
    sent_r5 = requests.post(f"{insurance}/fhir/CoverageEligibilityRequest", json=eligibility_request(), timeout=10,
                            headers={**operations_headers(settings),
                                     "Content-Type": "application/fhir+json; fhirVersion=5.0"})  # fmt: skip
    assert sent_r5.status_code == 415
    assert "fhirVersion=4.0" in (OperationOutcome.model_validate(sent_r5.json()).issue[0].diagnostics or "")
