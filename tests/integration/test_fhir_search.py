"""The FHIR R4 create, read and search a hospital's integration engineer expects, through fhirpy against the
services over HTTP: the order is created and read back by its Location, a partner finds its orders, their Tasks
and their reports by search and pages through them by `next`, another partner's key finds nothing, and an
eligibility answer is kept and read back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.coverageeligibilityresponse import CoverageEligibilityResponse
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome as OutcomeRaised
from fhirpy.base.exceptions import ResourceNotFound
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.auth import audit
from services.common.config import Settings
from services.intake.models import IdempotencyRecord
from services.review.models import Report
from tests.integration.test_fhir_client_review_insurance import (
    ReviewClient,
    fhir_client,
    insurance,
    review,
    review_engine,
)
from tests.integration.test_insurance_api import eligibility_request
from tests.integration.test_intake_api import new_partner
from tests.integration.test_intake_fhir import contained_request, order
from tests.integration.test_intake_fhir_client import Served, outcome_of, served
from tests.integration.test_review_flow import FINDINGS, apply, assigned_review, compose_command
from tests.keys import operations_headers, specialist_headers

__all__ = ["insurance", "review", "review_engine", "served"]  # fixtures of the modules they come from
SYSTEM = "urn:hospital-a:order"  # contained_request's identifier system


def another(served: Served, name: str) -> Served:
    partner = new_partner(served.auth, name)
    return Served(served.base, partner["Authorization"], served.auth, served.intake, partner["partner_id"])


def bundle_of(answer: Any) -> Bundle:
    return Bundle.model_validate(dict(answer))


def test_a_created_order_is_the_service_request_read_back_by_its_location(served: Served) -> None:
    """The create answered the case's Task with `Location: [base]/Task/{id}`: FHIR's create answers the resource
    created, at [base]/ServiceRequest/{id}/_history/{vid}, and a client reads it back there."""
    headers = {"Authorization": served.authorization, "Content-Type": "application/fhir+json"}
    created = requests.post(f"{served.base}/ServiceRequest", json=contained_request("LOC-1"), headers=headers,
                            timeout=10)  # fmt: skip
    assert created.status_code == 201, created.text
    order_ = ServiceRequest.model_validate(created.json())
    assert created.headers["Location"] == f"{served.base}/ServiceRequest/{order_.id}/_history/1"
    assert (order_.meta.versionId, created.headers["ETag"]) == ("1", 'W/"1"')
    assert order_.meta.lastUpdated is not None and "Last-Modified" in created.headers
    assert [(i.system, i.value) for i in order_.identifier] == [(SYSTEM, "LOC-1")]
    assert (order_.status, order_.intent, order_.requester.identifier.value) == (
        "active",
        "order",
        "1234567893",
    )
    assert "MRN-0042" not in created.text and "Jane" not in created.text  # the case's patient, unnamed

    client = served.client()
    logged = audit.count(served.auth, partner_id=served.partner_id)
    by_location = client.execute(created.headers["Location"], method="get")
    read = client.get("ServiceRequest", order_.id)
    assert dict(by_location) == dict(read) == created.json()
    assert audit.count(served.auth, partner_id=served.partner_id) == logged + 2  # each read of the PHI
    unchanged = requests.get(f"{served.base}/ServiceRequest/{order_.id}", timeout=10,
                             headers={"Authorization": served.authorization, "If-None-Match": 'W/"1"'})  # fmt: skip
    assert unchanged.status_code == 304

    # The case's progress is the Task of the same id, which references the order.
    task = Task.model_validate(dict(client.get("Task", order_.id)))
    assert task.focus.reference == f"ServiceRequest/{order_.id}"
    assert [b.reference for b in task.basedOn] == [f"ServiceRequest/{order_.id}"]

    # Sent again: the order that exists, 200, not created again.
    again = requests.post(f"{served.base}/ServiceRequest", json=contained_request("LOC-1"), headers=headers,
                          timeout=10)  # fmt: skip
    assert (again.status_code, again.json()["id"], again.headers["Location"]) == (
        200,
        order_.id,
        created.headers["Location"],
    )

    # Another partner's key: a 404 OperationOutcome, nothing said of the order.
    with pytest.raises(ResourceNotFound) as raised:
        another(served, "Another hospital LOC").client().get("ServiceRequest", order_.id)
    [issue] = outcome_of(raised.value).issue
    assert issue.code == "not-found" and "LOC-1" not in str(raised.value)


def test_a_create_replayed_from_before_the_order_was_kept_answers_the_order(served: Served) -> None:
    """An Idempotency-Key's first answer stored by the previous release is the case's Task: replayed, it is
    answered as the order it made, at the order's Location, as a create now answers."""
    headers = {"Authorization": served.authorization, "Idempotency-Key": "REPLAY-1"}
    first = requests.post(f"{served.base}/ServiceRequest", json=contained_request("REPLAY-1"), headers=headers,
                          timeout=10)  # fmt: skip
    assert first.status_code == 201, first.text
    order_id = first.json()["id"]
    with Session(served.intake) as session:
        [stored] = session.exec(select(IdempotencyRecord).where(IdempotencyRecord.key == "REPLAY-1")).all()
        stored.response_json = json.dumps(requests.get(f"{served.base}/Task/{order_id}", timeout=10,
                                                       headers={"Authorization": served.authorization}).json())  # fmt: skip
        session.add(stored)
        session.commit()
    again = requests.post(f"{served.base}/ServiceRequest", json=contained_request("REPLAY-1"), headers=headers,
                          timeout=10)  # fmt: skip
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")
    assert again.json() == first.json() and again.headers["Location"] == first.headers["Location"]


def test_a_transaction_answers_the_order_it_created_at_its_own_location(served: Served) -> None:
    """The transaction-response's ServiceRequest entry carried the Task at the Task's location (R4
    http.html#transaction-response: the created resource's location); the Task is named in its outcome."""
    client = served.client()
    answer = bundle_of(client.execute("", data=order({"system": "urn:a:order", "value": "TX-1"})))
    [entry] = [e for e in answer.entry if e.response.location]
    created = ServiceRequest.model_validate(entry.resource.model_dump())
    assert entry.response.status == "201 Created" and entry.response.etag == 'W/"1"'
    assert entry.response.location == f"{served.base}/ServiceRequest/{created.id}/_history/1"
    assert dict(client.execute(entry.response.location, method="get"))["id"] == created.id
    hint = OperationOutcome.model_validate(entry.response.outcome.model_dump()).issue[0].diagnostics or ""
    assert f"{served.base}/Task/{created.id}" in hint
    assert "Jane" not in answer.model_dump_json() and "MRN-0042" not in answer.model_dump_json()


def test_a_partner_finds_its_orders_and_their_tasks_by_search_and_pages_by_next(served: Served) -> None:
    """`GET [base]/Task?…` and `GET [base]/ServiceRequest?…` were a 405: a partner could not find the Task of
    its order, nor list what it sent."""
    partner = another(served, "Searching hospital")
    client = partner.client()
    ids = [client.execute("ServiceRequest", data=contained_request(f"FIND-{n}"))["id"] for n in range(5)]

    [found] = client.resources("ServiceRequest").search(identifier=f"{SYSTEM}|FIND-3").fetch()
    assert found["id"] == ids[3]
    assert client.resources("ServiceRequest").search(identifier="FIND-3").count() == 1  # any system
    assert client.resources("ServiceRequest").search(identifier="urn:other|FIND-3").fetch() == []

    by_focus = bundle_of(
        client.resources("Task").search(focus=f"ServiceRequest/{ids[1]}").include("Task", "focus").fetch_raw()
    )
    assert by_focus.total == 1
    assert [(e.resource.get_resource_type(), e.search.mode) for e in by_focus.entry] == [
        ("Task", "match"),
        ("ServiceRequest", "include"),
    ]
    assert by_focus.entry[0].resource.id == by_focus.entry[1].resource.id == ids[1]
    [by_order] = client.resources("Task").search(**{"based-on": ids[2]}).fetch()
    assert by_order["id"] == ids[2]
    [by_reference] = client.resources("Task").search(**{"group-identifier": f"{SYSTEM}|FIND-4"}).fetch()
    assert by_reference["id"] == ids[4]
    assert {t["id"] for t in client.resources("Task").search(status="received").fetch_all()} == set(ids)
    assert client.resources("Task").search(status="completed").fetch() == []

    # Pages of two, newest first, each by its absolute next link; total every match.
    first = bundle_of(client.resources("Task").limit(2).fetch_raw())
    links = {link.relation: link.url for link in first.link}
    assert first.total == 5 and len(first.entry) == 2 and links["next"].startswith(f"{served.base}/Task?")
    assert parse_qs(urlparse(links["self"]).query)["_count"] == ["2"]
    paged = [t["id"] for t in client.resources("Task").limit(2)]  # fhirpy follows `next`
    assert paged == list(reversed(ids))

    # The form body of POST [type]/_search is the query string.
    posted = requests.post(f"{served.base}/ServiceRequest/_search", data={"identifier": "FIND-0"}, timeout=10,
                           headers={"Authorization": partner.authorization})  # fmt: skip
    assert posted.status_code == 200, posted.text
    assert [e.resource.id for e in Bundle.model_validate(posted.json()).entry] == [ids[0]]

    # Since a moment: the ones changed after it (none yet), the ones before.
    later = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert client.resources("Task").search(_lastUpdated=f"gt{later}").count() == 0
    assert client.resources("ServiceRequest").search(_lastUpdated=f"lt{later}").count() == 5

    # Another partner's key: an empty searchset, not a 404.
    stranger = another(served, "Stranger hospital").client()
    empty = bundle_of(stranger.resources("Task").search(focus=f"ServiceRequest/{ids[1]}").fetch_raw())
    assert (empty.type, empty.total, empty.entry) == ("searchset", 0, None)
    assert stranger.resources("ServiceRequest").search(identifier="FIND-3").fetch() == []


def test_unknown_parameters_are_left_out_or_refused_when_strict_and_bad_values_are_named(
    served: Served,
) -> None:
    """search.html#errors: an unknown parameter is ignored and left out of the self link, or with
    `Prefer: handling=strict` a 400 naming it; a value that cannot be read is a 400 naming the parameter, never
    echoing the value."""
    client = served.client()
    client.execute("ServiceRequest", data=contained_request("STRICT-1"))
    lenient = bundle_of(
        client.resources("ServiceRequest").search(identifier="STRICT-1", name="Jane").fetch_raw()
    )
    assert lenient.total == 1
    self_link = parse_qs(urlparse(lenient.link[0].url).query)
    assert self_link == {"identifier": ["STRICT-1"], "_count": ["20"]}
    with pytest.raises(OutcomeRaised) as strict:
        served.client(Prefer="handling=strict").resources("ServiceRequest").search(
            identifier="STRICT-1", name="Jane"
        ).fetch()
    [issue] = outcome_of(strict.value).issue
    assert issue.expression == ["name"] and "identifier" in (issue.diagnostics or "")
    assert "Jane" not in (issue.diagnostics or "")
    for kind, sent, parameter in (
        ("Task", {"_lastUpdated": "xx2026-12-01"}, "_lastUpdated"),
        ("Task", {"_lastUpdated": "ge2026-13-45"}, "_lastUpdated"),
        ("Task", {"status": "MRN-0042"}, "status"),
        ("Task", {"focus": "ServiceRequest/not an id"}, "focus"),
        ("ServiceRequest", {"identifier": f"{SYSTEM}|"}, "identifier"),
        ("ServiceRequest", {"_count": "many"}, "_count"),
    ):
        with pytest.raises(OutcomeRaised) as refused:
            client.resources(kind).search(**sent).fetch()
        [issue] = outcome_of(refused.value).issue
        assert issue.expression == [parameter], sent
        assert "MRN-0042" not in (issue.diagnostics or "") and "not an id" not in (issue.diagnostics or "")
    answer = requests.get(f"{served.base}/Task", params={"_lastUpdated": "bad"}, timeout=10,
                          headers={"Authorization": served.authorization})  # fmt: skip
    assert answer.status_code == 400 and answer.headers["Content-Type"].startswith("application/fhir+json")


def test_the_capability_statement_declares_each_search(served: Served) -> None:
    statement = CapabilityStatement.model_validate(dict(served.client().execute("metadata", method="get")))
    [rest] = statement.rest
    by_type = {r.type: r for r in rest.resource}
    params = {kind: {p.name for p in by_type[kind].searchParam or []} for kind in by_type}
    assert {"identifier", "focus", "based-on", "status", "_lastUpdated"} <= params["Task"]
    assert {"identifier", "status", "_lastUpdated"} <= params["ServiceRequest"]
    assert {"identifier", "based-on", "_lastUpdated"} <= params["DiagnosticReport"]
    assert by_type["Task"].searchInclude == ["Task:focus", "Task:based-on"]
    assert "ServiceRequest/{id}/_history/1" in (by_type["ServiceRequest"].documentation or "")
    assert {"read"} == {i.code for i in by_type["CoverageEligibilityResponse"].interaction}


def test_a_partner_finds_the_report_of_its_order(
    settings: Settings, served: Served, review_engine: Engine, review: str
) -> None:
    """`GET [base]/DiagnosticReport?based-on=…` was a 405: a partner could only read the report by the URL the
    Task's output gave."""
    partner = another(served, "Reporting hospital")
    command, assigned = assigned_review(
        review_engine,
        settings,
        partner_id=partner.partner_id,
        partner_case_ref="REP-1",
        partner_case_ref_system=SYSTEM,
    )
    signed = specialist_headers(settings)
    submitted = ReviewClient(review, settings).post(f"/v1/reviews/{assigned['review_id']}", json=FINDINGS,
                                                    headers=signed)  # fmt: skip
    assert submitted.status_code == 200, submitted.text
    case_id = command.subject
    apply(review_engine, settings, compose_command(case_id, assigned["review_id"]))
    with Session(review_engine) as session:
        report_id = session.exec(select(Report.id).where(Report.case_id == case_id)).one()

    client = SyncFHIRClient(f"{review}/fhir", authorization=partner.authorization)
    [by_order] = (
        client.resources("DiagnosticReport").search(**{"based-on": f"ServiceRequest/{case_id}"}).fetch()
    )
    assert DiagnosticReport.model_validate(dict(by_order)).id == report_id
    for sent in ({"based-on:identifier": f"{SYSTEM}|REP-1"}, {"identifier": f"urn:secondopinion:case|{case_id}"},
                 {"_lastUpdated": "ge2020-01-01", "based-on:identifier": "REP-1"}):  # fmt: skip
        found = bundle_of(client.resources("DiagnosticReport").search(**sent).fetch_raw())
        assert (found.total, [e.resource.id for e in found.entry]) == (1, [report_id]), sent
        assert found.link[0].url.startswith(f"{settings.review_url}/fhir/DiagnosticReport?")
    assert client.resources("DiagnosticReport").search(**{"based-on:identifier": "urn:x|REP-1"}).fetch() == []
    posted = requests.post(f"{review}/fhir/DiagnosticReport/_search", data={"based-on:identifier": "REP-1"},
                           headers={"Authorization": partner.authorization}, timeout=10)  # fmt: skip
    assert [e["resource"]["id"] for e in posted.json()["entry"]] == [report_id]

    stranger = SyncFHIRClient(f"{review}/fhir", authorization=another(served, "Other reader").authorization)
    empty = bundle_of(stranger.resources("DiagnosticReport").search(**{"based-on": case_id}).fetch_raw())
    assert (empty.total, empty.entry) == (0, None)
    operations = fhir_client(review, settings).resources("DiagnosticReport")
    assert operations.search(**{"based-on": case_id}).count() == 1
    with pytest.raises(OutcomeRaised) as strict:
        fhir_client(review, settings, Prefer="handling=strict").resources("DiagnosticReport").search(
            subject="Patient/x"
        ).fetch()
    assert outcome_of(strict.value).issue[0].expression == ["subject"]


def test_an_eligibility_answer_is_kept_and_read_back_by_the_partner_that_asked(
    settings: Settings, served: Served, insurance: str
) -> None:
    """POST CoverageEligibilityRequest answered 200 without a Location, nothing kept: a client could not read the
    answer again. It is a create (201) whose Location reads the CoverageEligibilityResponse back."""
    partner = another(served, "Eligibility hospital")
    headers = {"Authorization": partner.authorization, "Content-Type": "application/fhir+json"}
    answer = requests.post(f"{insurance}/fhir/CoverageEligibilityRequest", json=eligibility_request(),
                           headers=headers, timeout=10)  # fmt: skip
    assert answer.status_code == 201, answer.text
    response = CoverageEligibilityResponse.model_validate(answer.json())
    assert answer.headers["Location"] == (
        f"{settings.insurance_url}/fhir/CoverageEligibilityResponse/{response.id}/_history/1"
    )
    assert (response.meta.versionId, answer.headers["ETag"]) == ("1", 'W/"1"')
    client = SyncFHIRClient(f"{insurance}/fhir", authorization=partner.authorization)
    read = client.get("CoverageEligibilityResponse", response.id)
    assert dict(read) == answer.json() and read["insurance"][0]["inforce"] is True
    minimal = requests.post(f"{insurance}/fhir/CoverageEligibilityRequest", json=eligibility_request(),
                            headers={**headers, "Prefer": "return=minimal"}, timeout=10)  # fmt: skip
    assert (minimal.status_code, minimal.content) == (201, b"")
    kept = minimal.headers["Location"].split("/CoverageEligibilityResponse/")[1].split("/")[0]
    assert client.get("CoverageEligibilityResponse", kept)["outcome"] == "complete"

    stranger = SyncFHIRClient(
        f"{insurance}/fhir", authorization=another(served, "Other payer asker").authorization
    )
    with pytest.raises(ResourceNotFound) as raised:
        stranger.get("CoverageEligibilityResponse", response.id)
    assert outcome_of(raised.value).issue[0].code == "not-found"
    operations = requests.get(f"{insurance}/fhir/CoverageEligibilityResponse/{response.id}", timeout=10,
                              headers=operations_headers(settings))  # fmt: skip
    assert operations.status_code == 200


def test_the_request_an_eligibility_answer_names_is_kept_and_read_by_the_partner_that_sent_it(
    settings: Settings, served: Served, insurance: str
) -> None:
    """The response's `request` named CoverageEligibilityRequest/{the id the client sent}, which nobody kept: a
    FHIR client resolving it got a 404. The request is kept with the response, under the id the server gave."""
    partner = another(served, "Eligibility request reader")
    client = SyncFHIRClient(f"{insurance}/fhir", authorization=partner.authorization)
    sent = {**eligibility_request(), "id": "client-side-1"}
    response = client.execute("CoverageEligibilityRequest", data=sent)
    reference = response["request"]["reference"]
    assert reference == f"CoverageEligibilityRequest/{response['id']}"  # FHIR create: the server's id
    assert client.reference(reference=reference).to_resource()["id"] == response["id"]  # a client resolves it
    read = requests.get(
        f"{insurance}/fhir/{reference}", headers={"Authorization": partner.authorization}, timeout=10
    )
    kept = read.json()
    assert (kept["id"], kept["meta"]["versionId"], read.headers["ETag"]) == (response["id"], "1", 'W/"1"')
    assert {k: v for k, v in kept.items() if k not in ("id", "meta")} == {
        k: v for k, v in sent.items() if k != "id"
    }  # as sent: the contained Coverage, the patient, the service asked about
    again = requests.get(f"{insurance}/fhir/{reference}", timeout=10,
                         headers={"Authorization": partner.authorization, "If-None-Match": 'W/"1"'})  # fmt: skip
    assert again.status_code == 304

    stranger = SyncFHIRClient(
        f"{insurance}/fhir", authorization=another(served, "Other reader").authorization
    )
    with pytest.raises(ResourceNotFound) as raised:
        stranger.get("CoverageEligibilityRequest", response["id"])
    assert "ACM100200300" not in str(outcome_of(raised.value).issue[0].diagnostics)
    with pytest.raises(ResourceNotFound):
        client.get("CoverageEligibilityRequest", "client-side-1")  # the id sent is not the kept one's
    logged = audit.count(served.auth, partner_id=partner.partner_id)
    client.get("CoverageEligibilityRequest", response["id"])
    assert audit.count(served.auth, partner_id=partner.partner_id) == logged + 1  # each read of the PHI
