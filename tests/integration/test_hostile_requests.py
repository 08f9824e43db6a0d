"""Inputs no schema describes, sent to every route of the four services as their own OpenAPI documents list
them, with an operations key and a partner's: no answer is a 5xx, and none quotes what was sent.

Each kind here was a 500, or an answer that misled, on some route before (git log names them): a NUL
(%00) in a path or query value, a time without an offset or one UTC cannot hold, an id longer than a case
id, a JSON text with a lone surrogate escape or a NUL, JSON nested deeper than Python reads, a number of
5000 digits, a body that is not UTF-8. The values carry a patient's name: no error body may carry it back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import api as partners_api
from services.auth import auth_engine
from services.auth.models import Role
from services.auth.partners import create_partner, issue_key
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.insurance import api as insurance_api
from services.insurance import fhir as insurance_fhir
from services.intake import api as intake_api
from services.intake import fhir_api, webhooks_in, webhooks_out_api
from services.records import api as records_api
from services.records import dicomweb
from services.review import api as review_api
from services.review import deps as review_deps

NAME = "Jane"  # in every hostile value; never in an answer
PATH_VALUES = {
    "NUL": f"{NAME}%00Doe",
    "longer than an id": f"{NAME}-" + "7" * 300,
    "lone surrogate, percent-encoded": f"%ED%A0%80{NAME}",
    "traversal": f"..%2F..%2F{NAME}",
}
QUERY_VALUES = {
    "NUL": f"{NAME}%00Doe",
    "a date": "2026-12-01",
    "a time UTC cannot hold": "0001-01-01T00:00:00%2B01:00",
    "5000 digits": "9" * 5000,
    "repeated": f"{NAME}&{{name}}=-1",
}
BODIES = {
    "lone surrogate": b'{"name": "' + NAME.encode() + b' \\ud800", "resourceType": "Bundle"}',
    "NUL": b'{"name": "' + NAME.encode() + b' \\u0000", "resourceType": "Bundle"}',
    "nested too deep": b"[" * 5000 + b"]" * 5000,
    "5000 digits": b'{"resourceType": "Bundle", "n": ' + b"9" * 5000 + b"}",
    "not UTF-8": b'{"name": "' + NAME.encode() + b' \xff\xfe"}',
    "a NUL after deep nesting": b'{"a": "\\u0000", "b": ' + b"[" * 3000 + b"]" * 3000 + b"}",
}


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str  # the template, e.g. /v1/cases/{case_id}
    query: tuple[str, ...]
    json_body: bool


def service_apps(settings: Settings, auth: Engine) -> dict[str, FastAPI]:
    """The four HTTP services with every router their main module mounts, on this session's database."""
    intake = create_app(
        "intake",
        routers=[
            intake_api.router,
            fhir_api.router,
            webhooks_in.router,
            partners_api.router,
            webhooks_out_api.router,
        ],
        engine=lambda: get_engine("intake"),
    )
    intake.dependency_overrides[intake_api.temporal_client] = lambda: None
    records = create_app(
        "records",
        routers=[records_api.router, dicomweb.router],
        engine=lambda: get_engine("records"),
        max_body_bytes=None,
    )
    insurance = create_app(
        "insurance",
        routers=[insurance_api.router, insurance_fhir.router],
        engine=lambda: get_engine("insurance"),
    )
    review = create_app("review", routers=[review_api.router], engine=lambda: get_engine("review"))
    review.dependency_overrides[review_deps.review_engine] = lambda: get_engine("review")
    apps = {"intake": intake, "records": records, "insurance": insurance, "review": review}
    for app in apps.values():
        app.dependency_overrides[auth_engine] = lambda: auth
        app.dependency_overrides[get_settings] = lambda: settings
    return apps


def routes(service: str, app: FastAPI) -> list[Route]:
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            content = (operation.get("requestBody") or {}).get("content") or {}
            found.append(
                Route(
                    service,
                    method.upper(),
                    path,
                    tuple(p["name"] for p in operation.get("parameters", []) if p["in"] == "query"),
                    any(media.endswith("json") for media in content),
                )
            )
    return found


@dataclass
class Services:
    clients: dict[str, TestClient]
    routes: list[Route]
    keys: dict[str, str]


@pytest.fixture(scope="module")
def services(settings: Settings) -> Iterator[Services]:
    get_engine.cache_clear()  # every service's engine on this session's database
    for name in ("auth", "intake", "records", "insurance", "review"):
        migrate.upgrade(name, get_engine(name))
    auth = get_engine("auth")
    with Session(auth) as session:
        partner = create_partner(session, "Hostile Clinic")
        operations = issue_key(session, Role.OPERATIONS, None, label="hostile")
        session.commit()
    apps = service_apps(settings, auth)
    clients = {name: TestClient(app, raise_server_exceptions=False) for name, app in apps.items()}
    keys = {"operations": operations.api_key, "partner": partner.api_key}
    with clients["intake"], clients["records"], clients["insurance"], clients["review"]:
        yield Services(clients, [r for name, app in apps.items() for r in routes(name, app)], keys)


def filled(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def checked(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    assert NAME not in answered(response), f"{what} quoted the value sent: {response.text[:300]}"


def answered(response: Any) -> str:
    """The answer's text, but for a FHIR searchset's self link: the search as the server applied it (R4
    search.html#self), which the client sent; every other part, its next link too, is checked."""
    if not response.headers.get("content-type", "").startswith("application/fhir+json"):
        return str(response.text)
    body = response.json()
    if body.get("resourceType") != "Bundle" or body.get("type") != "searchset":
        return str(response.text)
    links = [link for link in body.get("link", []) if link.get("relation") != "self"]
    return json.dumps({**body, "link": links})


@pytest.mark.parametrize("key", ["operations", "partner"])
def test_no_path_value_gives_a_server_error_or_comes_back(services: Services, key: str) -> None:
    headers = {"Authorization": f"Bearer {services.keys[key]}"}
    templated = [r for r in services.routes if "{" in r.path]
    assert len(templated) > 40  # the four services' object routes, not an empty document
    for route in templated:
        for kind, value in PATH_VALUES.items():
            url = filled(route.path, value)
            response = services.clients[route.service].request(route.method, url, headers=headers)
            checked(response, f"{route.method} {route.path} with a path value ({kind}), {key} key")


@pytest.mark.parametrize("key", ["operations", "partner"])
def test_no_query_value_gives_a_server_error_or_comes_back(services: Services, key: str) -> None:
    headers = {"Authorization": f"Bearer {services.keys[key]}"}
    for route in [r for r in services.routes if r.query and r.method == "GET"]:
        url = filled(route.path, "00000000-0000-4000-8000-000000000000")
        for name in route.query:
            for kind, value in QUERY_VALUES.items():
                query = f"{name}={value.format(name=name)}"
                response = services.clients[route.service].get(f"{url}?{query}", headers=headers)
                checked(response, f"GET {route.path}?{name}= ({kind}), {key} key")


@pytest.mark.parametrize("key", ["operations", "partner"])
def test_no_json_body_gives_a_server_error_or_comes_back(services: Services, key: str) -> None:
    json_routes = [r for r in services.routes if r.json_body]
    assert len(json_routes) > 15
    for route in json_routes:
        media = "application/fhir+json" if route.path.startswith("/fhir") else "application/json"
        headers = {"Authorization": f"Bearer {services.keys[key]}", "Content-Type": media}
        url = filled(route.path, "00000000-0000-4000-8000-000000000000")
        for kind, body in BODIES.items():
            response = services.clients[route.service].request(
                route.method, url, content=body, headers=headers
            )
            checked(response, f"{route.method} {route.path} with a body ({kind}), {key} key")
