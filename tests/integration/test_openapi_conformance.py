"""Every service answers what its OpenAPI document declares (schemathesis, from each service's own document).

Each operation is called with inputs generated from its document (its documented examples first) and every
answer is checked: no 5xx, a declared status code, a declared content type and headers, and a body that fits
the declared schema (errors included: a problem, or an OperationOutcome under /fhir). The ids in the path are
those of a real case of partner B (tests.integration.test_tenancy_matrix's world: records collected, coverage
decided, review submitted, report composed), so answers get past the 404 and their bodies are checked too;
each route is called with the key of the role it serves. Runs on the real PostgreSQL; Temporal is down, which
must also never turn into a 500. Bounded: documented examples and two generated inputs per operation.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from scripts.synthetic_study import make_us_instance
from services.auth import api as partners_api
from services.auth import auth_engine, smart_api
from services.auth.deps import rate_limiter
from services.auth.rate_limit import RateLimiter
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.insurance import api as insurance_api
from services.insurance import fhir as insurance_fhir
from services.intake import api as intake_api
from services.intake import fhir_api, webhooks_in, webhooks_out_api
from services.records import api as records_api
from services.records import dicomweb, export, timeline
from services.review import api as review_api
from services.review import deps as review_deps
from services.review.models import Specialist
from tests.integration.test_tenancy_matrix import World, world  # noqa: F401 - the module's fixture

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The schemas are read at import (to parametrize the tests); the databases and keys only exist once `world` does.
WORLD: list[World] = []
SETTINGS: list[Settings] = []
STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.10.777",
    "1.2.826.0.1.3680043.10.777.1",
    "1.2.826.0.1.3680043.10.777.1.1",
)
UNLIMITED = RateLimiter(per_second=0, burst=0)  # hundreds of calls on one key; the limit has its own tests


def _engine(service: str) -> Engine:
    return get_engine(service)


def _app(service: str, routers: list[Any]) -> FastAPI:
    app = create_app(service, routers=routers, engine=lambda: _engine(service))
    app.dependency_overrides[auth_engine] = lambda: _engine("auth")
    app.dependency_overrides[get_settings] = lambda: SETTINGS[0]
    app.dependency_overrides[rate_limiter] = lambda: UNLIMITED
    return app


intake = _app(
    "intake",
    [intake_api.router, fhir_api.router, webhooks_in.router, partners_api.router, webhooks_out_api.router,
     smart_api.token_router, smart_api.clients_router],
)  # fmt: skip
intake.dependency_overrides[intake_api.intake_engine] = lambda: _engine("intake")
intake.dependency_overrides[intake_api.temporal_client] = lambda: None
records = _app("records", [records_api.router, export.router, timeline.router, dicomweb.router])
insurance = _app("insurance", [insurance_api.router, insurance_fhir.router])
review = _app("review", [review_api.router])
review.dependency_overrides[review_deps.review_engine] = lambda: _engine("review")


def _zip() -> bytes:
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        archive.writestr("REPORT.TXT", "PELVIC ULTRASOUND original report")
    return body.getvalue()


for _media in ("application/zip", "application/x-zip-compressed"):  # a CD as one ZIP body (records' archive)
    schemathesis.openapi.media_type(_media, st.sampled_from([_zip(), b"PK\x03\x04"]))

# The coverage phase alone makes ~40 calls per operation; the documented examples and a few generated inputs
# find what a mismatch between a route and its document looks like.
CONFIG = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
BOUNDED = settings(max_examples=2, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


def _schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def directory_as_it_was() -> Iterator[None]:
    """The examples add, change and deactivate specialists (spec-gyn-1 among them): the directory is put back
    as it was once the module is done, so that the review tests after it match as they expect."""
    engine = get_engine("review")
    migrate.upgrade("review", engine)
    with Session(engine) as session:
        before = [s.model_dump() for s in session.exec(select(Specialist)).all()]
    yield
    with Session(engine) as session:
        kept = {row["id"] for row in before}
        for added in session.exec(select(Specialist).where(col(Specialist.id).not_in(kept))).all():
            session.delete(added)
        for row in before:
            session.merge(Specialist(**row))
        session.commit()


@pytest.fixture(scope="module", autouse=True)
def known(world: World, settings: Settings, directory_as_it_was: None) -> None:  # noqa: F811 - the imported fixture
    migrate.upgrade("intake", get_engine("intake"))  # the world has the other services' schemas
    SETTINGS[:] = [settings]
    WORLD[:] = [world]
    # One ultrasound image of case B's patient, so DICOMweb's retrieve, metadata and frames answer 200 too.
    image = make_us_instance(study_uid=STUDY, series_uid=SERIES, sop_uid=SOP, patient_id="M1")
    with TestClient(records) as client:
        uploaded = client.post(
            f"/v1/records/{world.case_b}/files",
            files=[("files", ("IM0001.dcm", image, "application/dicom"))],
            headers={"Authorization": f"Bearer {world.keys['b']}"},
        )
    assert uploaded.status_code == 201, uploaded.text


def key_for(service: str, path: str) -> str:
    """The role each route serves: operations for the directory, partners' settings and their sources, the
    reviewer for the reviews, partner B for its case."""
    w = WORLD[0]
    if path.startswith(("/v1/partners", "/v1/specialists", "/v1/records/sources", "/fhir/Practition")):
        return w.keys["ops"]
    if path.startswith("/v1/reviews") and not path.endswith("/stats"):
        return w.keys["reviewer"]
    if path.startswith("/v1/reviews"):
        return w.keys["ops"]
    return w.keys["b"]


def call(service: str, case: Any) -> None:
    w = WORLD[0]
    known_ids = {"case_id": w.case_b, "review_id": w.review_b, "report_id": w.report_b, "sha256": w.file_b,
                 "partner_id": w.partner_b, "specialist_id": w.reviewer, "study": STUDY, "series": SERIES,
                 "sop": SOP, "frames": "1"}  # fmt: skip
    for name, value in known_ids.items():
        if name in (case.path_parameters or {}):
            case.path_parameters[name] = value
    case.call_and_validate(headers={"Authorization": f"Bearer {key_for(service, case.path)}"}, checks=CHECKS)


@_schema(intake).parametrize()
@BOUNDED
def test_intake_answers_as_its_document_declares(case: Any) -> None:
    call("intake", case)


@_schema(records).parametrize()
@BOUNDED
def test_records_answers_as_its_document_declares(case: Any) -> None:
    call("records", case)


@_schema(insurance).parametrize()
@BOUNDED
def test_insurance_answers_as_its_document_declares(case: Any) -> None:
    call("insurance", case)


@_schema(review).parametrize()
@BOUNDED
def test_review_answers_as_its_document_declares(case: Any) -> None:
    call("review", case)


# A client generated from each document, as an integration team makes one (openapi-python-client), and one
# documented call per service through it. The binary media types are read as bytes (the generator's own
# setting; it does not parse a PDF, a ZIP, a DICOM file or an image), and its formatter is not run.
GENERATOR_CONFIG = """\
post_hooks: []
content_type_overrides:
  application/zip: application/octet-stream
  application/x-zip-compressed: application/octet-stream
  application/dicom: application/octet-stream
  application/pdf: application/octet-stream
  multipart/related: application/octet-stream
  image/jpeg: application/octet-stream
  image/png: application/octet-stream
  image/gif: application/octet-stream
  video/mp4: application/octet-stream
"""
SERVICES = {"intake": intake, "records": records, "insurance": insurance, "review": review}


def generator() -> str:
    found = shutil.which(
        "openapi-python-client", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if found is None:
        pytest.fail("openapi-python-client is missing: make install (a dev dependency)")
    return found


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    """Each service's generated client package, imported; generation must not warn about anything."""
    where = tmp_path_factory.mktemp("clients")
    (where / "config.yaml").write_text(GENERATOR_CONFIG)
    for service, app in SERVICES.items():
        (where / f"{service}.json").write_text(json.dumps(app.openapi()))
        done = subprocess.run(
            [generator(), "generate", "--path", str(where / f"{service}.json"), "--meta", "none",
             "--output-path", str(where / f"{service}_client"), "--config", str(where / "config.yaml")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        said = done.stdout + done.stderr
        assert done.returncode == 0 and "warning" not in said.lower(), f"{service}: {said}"
    sys.path.insert(0, str(where))
    try:
        for service in SERVICES:
            importlib.import_module(f"{service}_client.models")
        yield {service: importlib.import_module(f"{service}_client") for service in SERVICES}
    finally:
        sys.path.remove(str(where))
        for name in [
            n for n in sys.modules if n.split(".")[0].endswith("_client") and n.split(".")[0][:-7] in SERVICES
        ]:
            del sys.modules[name]


def through(clients: dict[str, ModuleType], service: str, key: str) -> Any:
    """The generated AuthenticatedClient of `service`, sending through the app in process with `key`."""
    client = clients[service].AuthenticatedClient(
        base_url="http://testserver", token=key, raise_on_unexpected_status=True
    )
    client.set_httpx_client(TestClient(SERVICES[service], headers={"Authorization": f"Bearer {key}"}))
    return client


def operation(clients: dict[str, ModuleType], service: str, module: str) -> Any:
    return importlib.import_module(f"{service}_client.api.{module}")


README_CASE = {
    "partner_case_ref": "REF-1001",
    "patient": {"family_name": "Doe", "given_name": "Jane", "birth_date": "1984-03-02", "sex": "female",
                "mrn": "MRN-0042", "state": "CA"},
    "referring": {"name": "Dr. Alex Kim", "npi": "1234567893", "organization": "Bayview Women's Clinic"},
    "exam": {"exam_type": "pelvic", "performed_on": "2026-11-20", "facility": "Bayview Imaging"},
    "clinical_question": "Complex adnexal mass: benign or suspicious?",
    "reason": "possible_malignancy",
    "coverage": {"plan_code": "ACME-PPO", "member_id": "W123456789"},
}  # fmt: skip


def test_a_generated_intake_client_creates_a_case_and_reads_it_back(clients: dict[str, ModuleType]) -> None:
    w, models = WORLD[0], clients["intake"].models
    client = through(clients, "intake", w.keys["b"])
    create = operation(clients, "intake", "cases.create_case_v1_cases_post")
    created = create.sync_detailed(
        client=client, body=models.CaseCreate.from_dict(README_CASE), idempotency_key="REF-1001"
    )
    assert created.status_code == 201 and isinstance(created.parsed, models.CasePublic), created.content
    read = operation(clients, "intake", "cases.get_case_v1_cases_case_id_get").sync(
        created.parsed.case_id, client=client
    )
    assert isinstance(read, models.CasePublic)
    assert (read.case_id, read.partner_case_ref) == (created.parsed.case_id, "REF-1001")


def test_a_generated_records_client_lists_a_cases_records(clients: dict[str, ModuleType]) -> None:
    w, models = WORLD[0], clients["records"].models
    got = operation(clients, "records", "records.get_records_v1_records_case_id_get").sync(
        w.case_b, client=through(clients, "records", w.keys["b"])
    )
    assert isinstance(got, models.RecordsPublic)
    assert w.file_b in [f.sha256 for f in got.files]


def test_a_generated_insurance_client_reads_a_cases_coverage(clients: dict[str, ModuleType]) -> None:
    w, models = WORLD[0], clients["insurance"].models
    got = operation(clients, "insurance", "coverage.get_verification_v1_coverage_case_id_get").sync(
        w.case_b, client=through(clients, "insurance", w.keys["b"])
    )
    assert isinstance(got, models.CoverageVerificationPublic)
    assert (got.case_id, got.coverage_status, got.cpt) == (w.case_b, "covered", "76140")


def test_a_generated_review_client_reads_the_review_and_the_report(clients: dict[str, ModuleType]) -> None:
    w, models = WORLD[0], clients["review"].models
    detail = operation(clients, "review", "reviews.review_detail_v1_reviews_review_id_get").sync(
        w.review_b, client=through(clients, "review", w.keys["reviewer"])
    )
    assert isinstance(detail, models.ReviewDetail)
    assert (detail.review_id, detail.case_id, detail.status) == (w.review_b, w.case_b, "submitted")
    report = operation(clients, "review", "reports.get_report_v1_reports_case_id_get").sync(
        w.case_b, client=through(clients, "review", w.keys["b"])
    )
    assert not isinstance(report, dict | models.Problem), "the report's JSON has no declared schema"
    assert report.to_dict()["resourceType"] == "DiagnosticReport"
    assert report.to_dict()["id"] == w.report_b


def test_a_stow_that_stores_nothing_answers_as_the_document_declares() -> None:
    """STOW-RS's 409 is a DICOM Store Instances Response Module (application/dicom+json), not a problem; its
    200 and 202 too. The fuzzer's bodies never get that far (they are refused as malformed first)."""
    w = WORLD[0]
    not_dicom = (
        b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + b"not dicom" * 20 + b"\r\n--b0undary--\r\n"
    )
    stow = _schema(records)["/dicomweb/cases/{case_id}/studies"]["POST"]
    case = stow.Case(
        path_parameters={"case_id": w.case_b},
        headers={"Authorization": f"Bearer {w.keys['b']}",
                 "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'},
    )  # fmt: skip
    answer = case.call_and_validate(checks=CHECKS, data=not_dicom)
    assert answer.status_code == 409, answer.text


def test_every_json_answer_a_document_declares_has_a_schema() -> None:
    """A generated client returns an untyped dict (or nothing) for an answer declared without a schema, and
    FastAPI declared `application/json` with none beside the FHIR JSON that routes send themselves."""
    bare = [
        f"{service} {method.upper()} {path} {status} {kind}"
        for service, app in SERVICES.items()
        for path, operations in app.openapi()["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        for kind, media in (response.get("content") or {}).items()
        if kind.endswith("json") and not (media or {}).get("schema")
    ]
    assert bare == []


def test_dicomweb_refusing_an_accept_header_answers_as_the_document_declares() -> None:
    """A viewer asking for a media type a resource is not served as gets a 406 naming those it is."""
    w = WORLD[0]
    metadata = _schema(records)["/dicomweb/cases/{case_id}/studies/{study}/metadata"]
    case = metadata["GET"].Case(path_parameters={"case_id": w.case_b, "study": STUDY})
    answer = case.call_and_validate(
        headers={"Authorization": f"Bearer {w.keys['b']}", "Accept": "application/xml"}, checks=CHECKS
    )
    assert answer.status_code == 406, answer.text


def test_a_fhir_read_refusing_an_accept_header_answers_as_the_document_declares() -> None:
    """Every FHIR route serves FHIR R4 JSON only: another format asked for is a 406 OperationOutcome."""
    w = WORLD[0]
    read = _schema(review)["/fhir/DiagnosticReport/{report_id}"]["GET"]
    answer = read.Case(path_parameters={"report_id": w.report_b}).call_and_validate(
        headers={"Authorization": f"Bearer {w.keys['b']}", "Accept": "application/fhir+xml"}, checks=CHECKS
    )
    assert answer.status_code == 406, answer.text
