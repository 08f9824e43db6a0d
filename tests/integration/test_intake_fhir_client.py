"""Intake's FHIR R4 API as a hospital's integration meets it: through a FHIR client library (fhirpy) against
the service served over HTTP, checked against what its CapabilityStatement and docs/partners.md promise; and
the audit export, the one FHIR searchset intake pages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome as OutcomeRaised
from fhirpy.base.exceptions import ResourceNotFound
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CaseStatusChanged, new_event
from contracts.models import CaseStatus
from services.auth import api as partners_api
from services.auth import audit
from services.common.config import Settings, get_settings
from services.intake import api, consumer, fhir_api
from tests.infra import free_port
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import new_partner
from tests.integration.test_intake_fhir import contained_request, order

INGRESS = Path(__file__).parents[2] / "deploy" / "k8s" / "base" / "ingress.yaml"


@dataclass
class Served:
    base: str  # the FHIR base, [base] of FHIR R4 http.html
    authorization: str
    auth: Engine  # to issue another partner's key
    intake: Engine  # to move a case on, as the workflow's status events do
    partner_id: str

    def client(self, **headers: str) -> SyncFHIRClient:
        return SyncFHIRClient(self.base, authorization=self.authorization, extra_headers=headers or None)


@pytest.fixture(scope="module")
def served(settings: Settings) -> Iterator[Served]:
    """Intake's case and FHIR routes served by uvicorn on a free loopback port, INTAKE_URL pointing there."""
    engines = intake_engines(settings)
    port = free_port()
    public = settings.model_copy(update={"intake_url": f"http://127.0.0.1:{port}"})
    app = intake_app(engines, api.router, fhir_api.router, partners_api.router)
    app.dependency_overrides[api.settings_dep] = lambda: public
    app.dependency_overrides[get_settings] = lambda: public
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        partner = new_partner(engines[1], "FHIR client hospital")
        yield Served(
            f"{public.intake_url}/fhir",
            partner["Authorization"],
            engines[1],
            engines[0],
            partner["partner_id"],
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def outcome_of(raised: OutcomeRaised | ResourceNotFound) -> OperationOutcome:
    """The OperationOutcome a fhirpy error carries (its resource, or the body as text for a 404)."""
    resource = getattr(raised, "resource", None)
    if resource is None:
        return OperationOutcome.model_validate_json(str(raised))
    return OperationOutcome.model_validate(dict(resource))


def test_the_capability_statement_names_its_base_and_says_what_a_create_answers(served: Served) -> None:
    """It named no base (implementation.url), and nothing said that a ServiceRequest create answers a Task."""
    statement = CapabilityStatement.model_validate(dict(served.client().execute("metadata", method="get")))
    assert statement.fhirVersion == "4.0.1" and statement.format == ["json"]
    # A client finds the base its requests go to (cpb-15: an instance's implementation), absolute.
    assert statement.implementation.url == served.base
    [rest] = statement.rest
    order_type = next(r for r in rest.resource if r.type == "ServiceRequest")
    assert "Task" in (order_type.documentation or "")


def public_fhir_routes() -> set[tuple[str, str, str]]:
    """(service, method, path) of every FHIR route the ingress takes to a service: the one public base."""
    import yaml
    from starlette.routing import Route

    from services.insurance import fhir as insurance_fhir
    from services.review import api_directory, api_reports

    [ingress] = [d for d in yaml.safe_load_all(INGRESS.read_text()) if d and d["kind"] == "Ingress"]
    rules = [(p["path"], p["pathType"], p["backend"]["service"]["name"])
             for p in ingress["spec"]["rules"][0]["http"]["paths"]]  # fmt: skip

    def routed_to(path: str) -> str | None:
        for prefix, kind, owner in rules:
            if path == prefix or (kind == "Prefix" and path.startswith(prefix + "/")):
                return owner
        return None

    routers = {
        "intake": [fhir_api.router],
        "review": [api_reports.fhir, api_directory.fhir_practitioners],
        "insurance": [insurance_fhir.router],
    }
    found = set()
    for service, service_routers in routers.items():
        for router in service_routers:
            for route in router.routes:
                if not isinstance(route, Route) or "{resource_type}" in route.path:
                    continue  # the catch-all answering what is not declared
                if "/.well-known/" in route.path:
                    continue  # SMART discovery, not a FHIR interaction
                if routed_to(route.path) == service:
                    found |= {(service, method, route.path) for method in route.methods or ()}
    return found


def interaction(method: str, path: str) -> tuple[str, str]:
    """(resource type or "system", FHIR interaction code) of a route (FHIR R4 http.html)."""
    parts = [part for part in path.removeprefix("/fhir").split("/") if part]
    if not parts:
        return ("system", {"POST": "transaction"}.get(method, method))
    if parts == ["metadata"]:
        return ("system", {"GET": "capabilities"}.get(method, method))
    kind, instance = parts[0], len(parts) == 2
    if parts[1:] == ["_search"] and method == "POST":
        return (kind, "search-type")  # search by a form body: the same interaction as its GET
    if len(parts) == 4 and parts[2] == "_history" and method == "GET":
        return (kind, "vread")
    codes = {("POST", False): "create", ("GET", False): "search-type", ("GET", True): "read",
             ("PUT", True): "update", ("PATCH", True): "patch", ("DELETE", True): "delete"}  # fmt: skip
    return (kind, codes.get((method, instance), f"{method} {path}"))


def test_every_interaction_served_at_the_base_is_declared_and_every_declared_one_is_served(
    served: Served,
) -> None:
    """What the ingress serves under /fhir (intake, insurance, review) is what the CapabilityStatement says:
    CoverageEligibilityRequest was served there undeclared."""
    statement = CapabilityStatement.model_validate(dict(served.client().execute("metadata", method="get")))
    [rest] = statement.rest
    declared = {(r.type, i.code) for r in rest.resource for i in r.interaction}
    declared |= {("system", i.code) for i in rest.interaction} | {("system", "capabilities")}
    served_here = {interaction(method, path) for _, method, path in public_fhir_routes() if method != "HEAD"}
    assert served_here == declared


def test_a_client_creates_the_order_reads_its_task_and_follows_the_locations(served: Served) -> None:
    """The documented ways: POST ServiceRequest (resources contained) and the transaction Bundle; each answer
    names where the order is, as an absolute URL under the base that the client follows, and its case's Task
    has the order's id."""
    client = served.client()
    created = requests.post(
        f"{served.base}/ServiceRequest",
        json=contained_request("CLIENT-1"),
        headers={"Authorization": served.authorization, "Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    kept = ServiceRequest.model_validate(created.json())
    assert created.headers["Location"] == f"{served.base}/ServiceRequest/{kept.id}/_history/1"
    read = client.get("Task", kept.id)
    assert Task.model_validate(dict(read)).focus.reference == f"ServiceRequest/{kept.id}"
    assert dict(client.execute(created.headers["Location"], method="get"))["id"] == kept.id

    answer = Bundle.model_validate(
        dict(client.execute("", data=order({"system": "urn:a:order", "value": "C-2"})))
    )
    assert answer.type == "transaction-response"
    [entry] = [e for e in answer.entry if e.resource is not None]
    assert entry.response.location.startswith(f"{served.base}/ServiceRequest/")
    order_id = dict(client.execute(entry.response.location, method="get"))["id"]
    assert Task.model_validate(dict(client.get("Task", order_id))).status == "received"
    assert "Jane" not in answer.model_dump_json() and "MRN-0042" not in answer.model_dump_json()


@pytest.mark.parametrize(
    "ask",
    [
        lambda c, task_id: c.execute(f"ServiceRequest/{task_id}", method="put", data={}),  # update
        lambda c, task_id: c.execute(f"ServiceRequest/{task_id}/_history", method="get"),  # history
        lambda c, task_id: c.delete("Task", task_id),
        lambda c, task_id: c.execute(f"Task/{task_id}/_history/1", method="get"),  # vread
        lambda c, task_id: c.execute("metadata", method="post", data={}),
    ],
    ids=["update ServiceRequest", "history ServiceRequest", "delete Task", "vread Task", "POST metadata"],
)
def test_an_undeclared_interaction_is_a_405_saying_what_is_served(served: Served, ask: Any) -> None:
    """A search of Task or a read of the ServiceRequest was a 404 "Not Found" (both served now): a client took it
    for "no such resource" (fhirpy raises ResourceNotFound) when the interaction is simply not served."""
    client = served.client()
    task_id = client.execute("ServiceRequest", data=contained_request("CLIENT-405"))["id"]
    with pytest.raises(OutcomeRaised) as raised:
        ask(client, task_id)
    assert not isinstance(raised.value, ResourceNotFound)
    [issue] = outcome_of(raised.value).issue
    assert issue.code == "not-supported" and "GET [base]/metadata" in (issue.diagnostics or "")
    answer = requests.request("PUT", f"{served.base}/Task/{task_id}", json={}, timeout=10,
                              headers={"Authorization": served.authorization})  # fmt: skip
    assert (answer.status_code, answer.headers["Allow"]) == (405, "GET, HEAD")


def test_a_head_of_a_task_or_the_metadata_answers_what_a_get_would_without_the_body(served: Served) -> None:
    """RFC 9110 9.3.2: a client or a proxy checks a Task's version with HEAD (its ETag); it was a 405
    OperationOutcome saying only GET is allowed. A HEAD hands out no PHI: no audit entry."""
    task_id = served.client().execute("ServiceRequest", data=contained_request("CLIENT-HEAD"))["id"]
    headers = {"Authorization": served.authorization}
    got = requests.get(f"{served.base}/Task/{task_id}", headers=headers, timeout=10)
    logged = audit.count(served.auth, partner_id=served.partner_id)
    head = requests.head(f"{served.base}/Task/{task_id}", headers=headers, timeout=10)
    assert (head.status_code, head.content) == (200, b"")
    assert audit.count(served.auth, partner_id=served.partner_id) == logged  # nothing was handed out
    assert head.headers["ETag"] == got.headers["ETag"]
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert head.headers["Content-Length"] == got.headers["Content-Length"]
    assert requests.head(f"{served.base}/metadata", timeout=10).status_code == 200
    unknown = requests.head(f"{served.base}/Task/no-such-task", headers=headers, timeout=10)
    assert (unknown.status_code, unknown.content) == (404, b"")


def test_an_unknown_resource_type_is_a_404_naming_what_is_served(served: Served) -> None:
    with pytest.raises(ResourceNotFound) as raised:
        served.client().resources("Patient").search(name="Jane Doe").fetch()
    [issue] = outcome_of(raised.value).issue
    assert issue.code == "not-found" and "ServiceRequest (create, read, vread, search-type)" in (
        issue.diagnostics or ""
    )
    assert "Patient" not in (issue.diagnostics or "") and "Jane" not in (issue.diagnostics or "")


def test_prefer_return_is_honoured_on_create(served: Served) -> None:
    """FHIR R4 http.html#ops: `Prefer: return=minimal` (no body), `return=OperationOutcome` (an outcome);
    both were answered with the Task, which a client asking for minimal does not parse."""
    headers = {"Authorization": served.authorization, "Content-Type": "application/fhir+json"}
    minimal = requests.post(f"{served.base}/ServiceRequest", json=contained_request("PREFER-1"), timeout=10,
                            headers={**headers, "Prefer": "return=minimal"})  # fmt: skip
    assert (minimal.status_code, minimal.content) == (201, b""), minimal.text
    assert minimal.headers["Preference-Applied"] == "return=minimal"
    task_id = minimal.headers["Location"].split("/ServiceRequest/")[1].split("/")[0]
    assert served.client().get("Task", task_id)["id"] == task_id

    outcome = served.client(Prefer="return=OperationOutcome").execute(
        "ServiceRequest", data=contained_request("PREFER-2")
    )
    [issue] = OperationOutcome.model_validate(dict(outcome)).issue
    assert issue.severity == "information" and f"{served.base}/Task/" in (issue.diagnostics or "")

    # A conditional create that finds the case answers in the form asked too (200).
    found = requests.post(f"{served.base}/ServiceRequest", json=contained_request("PREFER-1"), timeout=10,
                          headers={**headers, "Prefer": "return=minimal",
                                   "If-None-Exist": "identifier=urn:hospital-a:order|PREFER-1"})  # fmt: skip
    assert (found.status_code, found.content, found.headers["Location"]) == (
        200,
        b"",
        minimal.headers["Location"],
    )

    bundle = served.client(Prefer="return=minimal").execute(
        "", data=order({"system": "urn:a:order", "value": "PREFER-3"})
    )
    entries = Bundle.model_validate(dict(bundle)).entry
    assert all(e.resource is None for e in entries)
    assert [e.response.location for e in entries if e.response.location][0].startswith(
        f"{served.base}/ServiceRequest/"
    )
    representation = served.client(Prefer="return=representation").execute(
        "ServiceRequest", data=contained_request("PREFER-4")
    )
    assert ServiceRequest.model_validate(dict(representation)).status == "active"


def test_errors_reach_the_client_as_operation_outcomes_and_keep_to_the_partner(served: Served) -> None:
    """404 another partner's Task, 422 an invalid order, 406 XML asked: each an OperationOutcome the library
    raises, naming nothing of the patient."""
    client = served.client()
    task_id = client.execute("ServiceRequest", data=contained_request("CLIENT-ERR"))["id"]
    another = new_partner(served.auth, "Another hospital")
    other = Served(served.base, another["Authorization"], served.auth, served.intake, another["partner_id"])
    with pytest.raises(ResourceNotFound) as raised:
        other.client().get("Task", task_id)
    assert outcome_of(raised.value).issue[0].code == "not-found" and "CLIENT-ERR" not in str(raised.value)
    # Its conditional create on the first partner's order reference finds nothing of the first partner's.
    condition = {"If-None-Exist": "identifier=urn:hospital-a:order|CLIENT-ERR"}
    theirs = other.client(**condition).execute("ServiceRequest", data=contained_request("CLIENT-ERR"))
    assert theirs["id"] != task_id
    # The R4B models take any code: a ServiceRequest of intent "wish", or a revoked order, made a case.
    for wrong, element in (({"intent": "wish"}, "intent"), ({"status": "revoked"}, "status")):
        with pytest.raises(OutcomeRaised) as refused:
            client.execute("ServiceRequest", data=contained_request("CLIENT-422") | wrong)
        [issue] = outcome_of(refused.value).issue
        assert (issue.code, issue.expression) == ("invalid", [f"ServiceRequest.{element}"])
    with pytest.raises(OutcomeRaised) as xml:
        client.execute(f"Task/{task_id}", method="get", params={"_format": "xml"})
    assert "JSON" in (outcome_of(xml.value).issue[0].diagnostics or "")


def test_an_order_sent_again_is_answered_200_not_created_again(served: Served) -> None:
    """The same order reference for the same patient answers the existing case: it was a 201, so a client
    (fhirpy's get_or_create reads the status) counted a second order that was never made."""
    orders = served.client().resources("ServiceRequest")
    first, created = orders.get_or_create(
        served.client().resource("ServiceRequest", **contained_request("AGAIN-1"))
    )
    again, created_again = orders.get_or_create(
        served.client().resource("ServiceRequest", **contained_request("AGAIN-1"))
    )
    assert (created, created_again) == (True, False)
    assert again["id"] == first["id"]
    bundle = order({"system": "urn:a:order", "value": "AGAIN-2"})
    statuses = [
        next(e.response.status for e in Bundle.model_validate(dict(served.client().execute("", data=bundle))).entry
             if e.response.location)
        for _ in range(2)
    ]  # fmt: skip
    assert statuses == ["201 Created", "200 OK"]


def test_a_fhir_version_other_than_r4_is_a_406_or_415(served: Served) -> None:
    """FHIR R4 http.html#version-parameter: a client asking for (or sending) FHIR 5.0 was answered as if R4
    were what it asked for."""
    task_id = served.client().execute("ServiceRequest", data=contained_request("VERSION-1"))["id"]
    with pytest.raises(OutcomeRaised) as asked:
        served.client(Accept="application/fhir+json; fhirVersion=5.0").get("Task", task_id)
    assert "fhirVersion=4.0" in (outcome_of(asked.value).issue[0].diagnostics or "")
    r4 = served.client(Accept="application/fhir+json; fhirVersion=4.0").get("Task", task_id)
    assert r4["id"] == task_id
    sent_r5 = served.client(**{"Content-Type": "application/fhir+json; fhirVersion=5.0"})
    with pytest.raises(OutcomeRaised) as sent:
        sent_r5.execute("ServiceRequest", data=contained_request("VERSION-2"))
    assert "fhirVersion=4.0" in (outcome_of(sent.value).issue[0].diagnostics or "")
    answer = requests.post(f"{served.base}/ServiceRequest", json=contained_request("VERSION-2"), timeout=10,
                           headers={"Authorization": served.authorization,
                                    "Content-Type": "application/fhir+json; fhirVersion=5.0"})  # fmt: skip
    assert answer.status_code == 415


def test_a_transaction_entry_asking_to_delete_or_get_is_refused_not_answered_done(served: Served) -> None:
    """Each entry was answered "200 OK" whatever its method: a DELETE of the Patient said done, and the
    Patient it carried became the case's patient."""
    client = served.client()
    for method, at in (("DELETE", 0), ("GET", 0), ("PUT", 1)):
        bundle = order({"system": "urn:a:order", "value": f"METHOD-{method}"})
        bundle["entry"][at]["request"] = {
            "method": method,
            "url": f"{bundle['entry'][at]['resource']['resourceType']}/x",
        }
        with pytest.raises(OutcomeRaised) as refused:
            client.execute("", data=bundle)
        [issue] = outcome_of(refused.value).issue
        assert issue.expression == [f"Bundle.entry[{at}].request.method"], method
    kept = order({"system": "urn:a:order", "value": "METHOD-PUT-PATIENT"})
    kept["entry"][0]["request"] = {
        "method": "PUT",
        "url": "Patient/pat",
    }  # a Patient may be sent as an update
    assert Bundle.model_validate(dict(client.execute("", data=kept))).type == "transaction-response"


def test_the_transaction_is_taken_at_the_base_with_its_slash(served: Served) -> None:
    """fhirpy posts a transaction to "[base]/": intake answered it with a redirect built from the Host header
    (http behind a TLS proxy), and the ingress did not route `/fhir/` at all."""
    bundle = order({"system": "urn:a:order", "value": "SLASH-1"})
    answer = requests.post(f"{served.base}/", json=bundle, timeout=10, allow_redirects=False,
                           headers={"Authorization": served.authorization})  # fmt: skip
    assert answer.status_code == 200, answer.headers
    assert Bundle.model_validate(answer.json()).type == "transaction-response"


def test_a_partner_polls_the_task_by_its_version(served: Served) -> None:
    """The Task had no meta.versionId and no ETag: a client polling it (fhirpy's refresh() sends If-None-Match
    with meta.versionId) read the whole Task every time, and refresh() failed on the missing meta."""
    client = served.client()
    task_id = client.execute("ServiceRequest", data=contained_request("POLL-1"))["id"]
    task = client.reference("Task", task_id).to_resource()
    version = Task.model_validate(dict(task)).meta.versionId
    asked = requests.get(f"{served.base}/Task/{task_id}", timeout=10,
                         headers={"Authorization": served.authorization, "If-None-Match": f'W/"{version}"'})  # fmt: skip
    assert (asked.status_code, asked.content, asked.headers["ETag"]) == (304, b"", f'W/"{version}"')
    task.refresh()  # 304: kept as it is
    assert task["meta"]["versionId"] == version and task["status"] == "received"

    event = new_event(id=f"wf:{task_id}:1", source="/workflows/case", subject=task_id,
                      data=CaseStatusChanged(case_id=task_id, status=CaseStatus.IN_REVIEW, previous=None,
                                             at=datetime.now(UTC) + timedelta(seconds=1)))  # fmt: skip
    with Session(served.intake) as session:
        consumer.handle(session, event)
        session.commit()
    task.refresh()
    assert task["status"] == "in-progress" and task["meta"]["versionId"] != version


def test_the_audit_export_pages_with_a_next_link_and_a_total_of_every_page(served: Served) -> None:
    """The export's searchset Bundle said `total` = the entries on the page (500 by default) and had no
    `link`: a partner with more than one page could not tell, nor read the rest."""
    client = served.client()
    for n in range(3):
        client.get("Task", client.execute("ServiceRequest", data=contained_request(f"AUDIT-{n}"))["id"])
    logged = [e.id for e in audit.entries(served.auth, partner_id=served.partner_id, limit=10_000)]
    root = SyncFHIRClient(served.base.removesuffix("/fhir"), authorization=served.authorization)
    page = Bundle.model_validate(dict(root.execute(f"v1/partners/{served.partner_id}/audit-events",
                                                  method="get", params={"limit": 2})))  # fmt: skip
    assert page.total == len(logged) and len(page.entry) == 2
    read = []
    while True:
        read += [e.resource.id for e in page.entry or []]
        links = {link.relation: link.url for link in page.link or []}
        assert links["self"].startswith(served.base.removesuffix("/fhir") + "/v1/partners/")
        if "next" not in links:
            break
        page = Bundle.model_validate(dict(root.execute(links["next"], method="get")))
    assert [int(i) for i in read][: len(logged)] == logged  # each once, in order; later exports after them


def test_a_path_with_a_trailing_slash_still_reaches_its_route(served: Served) -> None:
    """`POST [base]/ServiceRequest/` was redirected to the route without the slash; the route answering what
    is not declared must not take that away."""
    created = requests.post(f"{served.base}/ServiceRequest/", json=contained_request("SLASH-2"), timeout=10,
                            headers={"Authorization": served.authorization})  # fmt: skip
    assert created.status_code == 201 and [r.status_code for r in created.history] == [307]
    assert created.history[0].headers["Location"] == "/fhir/ServiceRequest"
