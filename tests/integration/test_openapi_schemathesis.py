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

import io
import zipfile
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
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

from services.auth import api as partners_api
from services.auth import auth_engine
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
    [intake_api.router, fhir_api.router, webhooks_in.router, partners_api.router, webhooks_out_api.router],
)
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
def known(world: World, settings: Settings) -> None:  # noqa: F811 - the imported fixture
    migrate.upgrade("intake", get_engine("intake"))  # the world has the other services' schemas
    SETTINGS[:] = [settings]
    WORLD[:] = [world]


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
                 "partner_id": w.partner_b, "specialist_id": w.reviewer}  # fmt: skip
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
