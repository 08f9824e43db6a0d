"""SMART Backend Services as a hospital's EHR drives it: operations register its client with a JWKS, the EHR
signs an assertion (RS384 or ES384), trades it at `POST /auth/token` for an access token, and calls the FHIR
API with it through fhirpy. Intake served by uvicorn on a loopback port (the assertion's aud is its URL), on
the real PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import requests
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.task import Task
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, ForbiddenError, ResourceNotFound
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.auth import api as partners_api
from services.auth import smart, smart_api
from services.auth.deps import rate_limiter
from services.auth.models import AuditEvent, SmartAccessToken, SmartClient
from services.auth.rate_limit import RateLimiter, get_token_rate_limiter
from services.common.config import PROJECT_ROOT, Settings, get_settings
from services.intake import api, fhir_api
from tests.infra import free_port
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import new_partner
from tests.integration.test_intake_fhir import contained_request
from tests.keys import operations_headers

READ_WRITE = "system/ServiceRequest.write system/Task.read system/*.read"


@dataclass
class Served:
    url: str  # the public base (INTAKE_URL)
    auth: Engine
    operations: dict[str, str]

    @property
    def token_url(self) -> str:
        return f"{self.url}/auth/token"

    @property
    def fhir(self) -> str:
        return f"{self.url}/fhir"


@pytest.fixture(scope="module")
def served(settings: Settings) -> Iterator[Served]:
    engines = intake_engines(settings)
    port = free_port()
    public = settings.model_copy(update={"intake_url": f"http://127.0.0.1:{port}"})
    app = intake_app(
        engines,
        api.router,
        fhir_api.router,
        partners_api.router,
        smart_api.token_router,
        smart_api.clients_router,
    )
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
        yield Served(public.intake_url, engines[1], operations_headers(settings))
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class SigningKey:
    alg: str
    kid: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.alg == "RS384" else jwt.algorithms.ECAlgorithm
        public = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(alg: str) -> SigningKey:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    return SigningKey(alg, f"{alg.lower()}-{uuid.uuid4().hex[:8]}", private)


@dataclass
class Registered:
    client_id: str
    partner_id: str
    key: SigningKey
    api_key: dict[str, str]  # the partner's API key header


def register(served: Served, alg: str = "ES384", scopes: str = READ_WRITE) -> Registered:
    partner = new_partner(served.auth, f"SMART hospital {alg}")
    key = new_key(alg)
    answer = requests.post(
        f"{served.url}/v1/partners/{partner['partner_id']}/smart-clients",
        json={"jwks": {"keys": [key.jwk()]}, "scopes": scopes, "label": "Epic test"},
        headers=served.operations,
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["token_endpoint"] == served.token_url and body["key_ids"] == [key.kid]
    return Registered(
        body["client_id"], partner["partner_id"], key, {"Authorization": partner["Authorization"]}
    )


def assertion(client: Registered, aud: str, **override: Any) -> str:
    now = int(time.time())
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": aud, "exp": now + 240,
              "jti": uuid.uuid4().hex} | override  # fmt: skip
    return jwt.encode(claims, client.key.private, algorithm=client.key.alg, headers={"kid": client.key.kid})


def ask_token(served: Served, signed: str, scope: str = READ_WRITE, **form: str) -> requests.Response:
    data = {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": signed} | form  # fmt: skip
    return requests.post(served.token_url, data=data, timeout=10)


def token_for(served: Served, client: Registered, scope: str = READ_WRITE) -> str:
    answer = ask_token(served, assertion(client, served.token_url), scope)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def fhir_client(served: Served, token: str) -> SyncFHIRClient:
    return SyncFHIRClient(served.fhir, authorization=f"Bearer {token}")


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_a_registered_client_gets_a_token_and_orders_and_reads_through_fhirpy(
    served: Served, alg: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = register(served, alg, scopes="system/ServiceRequest.write system/Task.read")
    signed = assertion(client, served.token_url)
    answer = ask_token(
        served, signed, scope="system/ServiceRequest.write system/Task.read system/Patient.read"
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert body["scope"] == "system/ServiceRequest.write system/Task.read"  # asked ∩ allowed (no Patient)
    token = body["access_token"]

    fhir = fhir_client(served, token)
    created = fhir.execute("ServiceRequest", data=contained_request(f"SMART-{alg}"))
    task = Task.model_validate(dict(fhir.get("Task", created["id"])))
    assert task.id == created["id"] and task.status == "received"
    # The case API takes the token too, within the partner.
    case = requests.get(
        f"{served.url}/v1/cases/{task.id}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert case.status_code == 200, case.text
    # The partner's API key keeps working as before, on the same case.
    assert (
        requests.get(f"{served.url}/v1/cases/{task.id}", headers=client.api_key, timeout=10).status_code
        == 200
    )

    with Session(served.auth) as session:
        stored = session.exec(
            select(SmartAccessToken).where(SmartAccessToken.client_id == client.client_id)
        ).one()
        entries = session.exec(
            select(AuditEvent).where(AuditEvent.actor == f"client:{client.client_id}")
        ).all()
    assert token not in stored.token_hash and stored.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert {(e.action, e.resource, e.outcome) for e in entries} >= {
        ("token", "auth.token", "success"),
        ("create", "case", "success"),
        ("read", "case", "success"),
    }
    assert all(e.partner_id == client.partner_id and e.role == "partner" for e in entries)
    said = capfd.readouterr()
    logged = said.out + said.err + caplog.text
    assert "smart.token_issued" in logged and client.client_id in logged  # what operations see
    for secret in (token, signed, signed.split(".")[2]):
        assert secret not in logged
        assert all(secret not in e.detail for e in entries)


def forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims_of(client: Registered, served: Served) -> dict[str, Any]:
    return {"iss": client.client_id, "sub": client.client_id, "aud": served.token_url,
            "exp": int(time.time()) + 240, "jti": uuid.uuid4().hex}  # fmt: skip


REFUSALS: dict[str, tuple[Any, str, str]] = {
    "wrong aud": (lambda s, c: assertion(c, f"{s.fhir}"), "invalid_client", "aud must be the token endpoint"),
    "expired": (
        lambda s, c: assertion(c, s.token_url, exp=int(time.time()) - 120),
        "invalid_client",
        "expired",
    ),
    "exp too far ahead": (
        lambda s, c: assertion(c, s.token_url, exp=int(time.time()) + 3600),
        "invalid_client",
        "more than 5 minutes",
    ),
    "unknown kid": (
        lambda s, c: jwt.encode(
            claims_of(c, s), c.key.private, algorithm=c.key.alg, headers={"kid": "other"}
        ),
        "invalid_client",
        "no key with the assertion's kid",
    ),
    "alg none": (
        lambda s, c: forged({"alg": "none", "kid": c.key.kid}, claims_of(c, s), None),
        "invalid_client",
        "RS384 or ES384",
    ),
    "HS256 with the public key as secret": (
        lambda s, c: forged(
            {"alg": "HS256", "kid": c.key.kid, "typ": "JWT"}, claims_of(c, s), c.key.public_pem()
        ),
        "invalid_client",
        "RS384 or ES384",
    ),
    "signed by another key of that kid": (
        lambda s, c: jwt.encode(
            claims_of(c, s), new_key(c.key.alg).private, algorithm=c.key.alg, headers={"kid": c.key.kid}
        ),
        "invalid_client",
        "signature does not verify",
    ),
    "not a JWT": (lambda s, c: "not-a-jwt", "invalid_client", "not a signed JWT"),
    "a jku where the keys are registered inline": (
        lambda s, c: jwt.encode(
            claims_of(c, s),
            c.key.private,
            algorithm=c.key.alg,
            headers={"kid": c.key.kid, "jku": "https://ehr.example.org/jwks.json"},
        ),
        "invalid_client",
        "leave jku out",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_bad_assertion_is_refused_with_the_rfc_6749_error_saying_what_to_fix(
    served: Served, case: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    make, error, description = REFUSALS[case]
    client = register(served, "RS384" if "HS256" in case else "ES384")
    signed = make(served, client)
    answer = ask_token(served, signed)
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"] == error
    assert description in answer.json()["error_description"]
    said = "".join(capfd.readouterr()) + caplog.text
    assert "smart.token_refused" in said and signed not in answer.text and signed not in said
    with Session(served.auth) as session:
        denied = session.exec(
            select(AuditEvent).where(AuditEvent.resource == "auth.token", AuditEvent.outcome == "denied")
        ).all()
    assert any(error in e.detail and description in e.detail for e in denied)


def test_a_replayed_assertion_is_refused(served: Served) -> None:
    client = register(served)
    signed = assertion(client, served.token_url)
    assert ask_token(served, signed).status_code == 200
    again = ask_token(served, signed)
    assert again.status_code == 400
    assert (
        again.json()["error"] == "invalid_client"
        and "jti was used already" in again.json()["error_description"]
    )


def test_grant_type_assertion_type_and_scope_are_checked(served: Served) -> None:
    client = register(served, scopes="system/Task.read")
    wrong_grant = ask_token(served, assertion(client, served.token_url), grant_type="authorization_code")
    assert (wrong_grant.status_code, wrong_grant.json()["error"]) == (400, "unsupported_grant_type")
    wrong_type = ask_token(served, assertion(client, served.token_url), client_assertion_type="password")
    assert wrong_type.json()["error"] == "invalid_client"
    not_allowed = ask_token(served, assertion(client, served.token_url), scope="system/ServiceRequest.write")
    assert not_allowed.json()["error"] == "invalid_scope"
    assert "system/Task.read" in not_allowed.json()["error_description"]  # what it may ask for
    malformed = ask_token(served, assertion(client, served.token_url), scope="patient/*.read")
    assert (
        malformed.json()["error"] == "invalid_scope"
        and "system scope" in malformed.json()["error_description"]
    )
    as_json = requests.post(served.token_url, json={"grant_type": "client_credentials"}, timeout=10)
    assert (as_json.status_code, as_json.json()["error"]) == (400, "invalid_request")


def test_an_expired_or_revoked_token_is_a_401_invalid_token(served: Served) -> None:
    client = register(served)
    token = token_for(served, client)
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{served.url}/v1/cases", headers=headers, timeout=10).status_code == 200
    with Session(served.auth) as session:
        session.execute(
            update(SmartAccessToken)
            .where(SmartAccessToken.id == token.split("_")[1])  # type: ignore[arg-type]
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        session.commit()
    expired = requests.get(f"{served.url}/v1/cases", headers=headers, timeout=10)
    assert expired.status_code == 401
    assert expired.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert "expired" in expired.json()["detail"]
    with pytest.raises(AuthorizationError) as raised:  # fhirpy's 401, the OperationOutcome its text
        fhir_client(served, token).get("Task", "anything")
    assert "expired" in str(raised.value)
    on_fhir = requests.get(f"{served.fhir}/Task/anything", headers=headers, timeout=10)
    assert on_fhir.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')

    fresh = token_for(served, client)
    revoked = requests.delete(
        f"{served.url}/v1/partners/{client.partner_id}/smart-clients/{client.client_id}",
        headers=served.operations,
        timeout=10,
    )
    assert revoked.status_code == 204
    refused = requests.get(f"{served.url}/v1/cases", headers={"Authorization": f"Bearer {fresh}"}, timeout=10)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    again = ask_token(served, assertion(client, served.token_url))
    assert again.json()["error"] == "invalid_client" and "revoked" in again.json()["error_description"]
    made_up = requests.get(
        f"{served.url}/v1/cases", headers={"Authorization": f"Bearer sat_{'0' * 12}_{'A' * 43}"}, timeout=10
    )
    assert made_up.status_code == 401 and 'error="invalid_token"' in made_up.headers["WWW-Authenticate"]


def test_a_read_only_token_cannot_write_and_is_told_which_scope_it_needs(served: Served) -> None:
    client = register(served)
    reader = token_for(served, client, scope="system/*.read")
    headers = {"Authorization": f"Bearer {reader}", "Content-Type": "application/fhir+json"}
    posted = requests.post(
        f"{served.fhir}/ServiceRequest", json=contained_request("SMART-RO"), headers=headers, timeout=10
    )
    assert posted.status_code == 403
    assert (
        posted.headers["WWW-Authenticate"]
        == 'Bearer error="insufficient_scope", scope="system/ServiceRequest.write"'
    )
    assert "system/ServiceRequest.write" in posted.json()["issue"][0]["diagnostics"]
    transaction = requests.post(served.fhir, json={"resourceType": "Bundle"}, headers=headers, timeout=10)
    assert transaction.status_code == 403
    case_api = requests.post(
        f"{served.url}/v1/cases", json={}, headers={"Authorization": f"Bearer {reader}"}, timeout=10
    )
    assert case_api.status_code == 403 and "system/ServiceRequest.write" in case_api.json()["detail"]
    # A writer without Task.read creates, and cannot read the Task back.
    writer = token_for(served, client, scope="system/ServiceRequest.write")
    created = fhir_client(served, writer).execute("ServiceRequest", data=contained_request("SMART-WO"))
    with pytest.raises(ForbiddenError) as raised:
        fhir_client(served, writer).get("Task", created["id"])
    assert "system/Task.read" in str(raised.value)
    with Session(served.auth) as session:
        denied = session.exec(
            select(AuditEvent).where(
                AuditEvent.actor == f"client:{client.client_id}", AuditEvent.outcome == "denied"
            )
        ).all()
    assert any("scope system/ServiceRequest.write not granted" in e.detail for e in denied)


def test_another_partners_case_stays_not_found(served: Served) -> None:
    mine, theirs = register(served), register(served)
    task_id = fhir_client(served, token_for(served, mine)).execute(
        "ServiceRequest", data=contained_request("SMART-T")
    )["id"]
    other = fhir_client(served, token_for(served, theirs))
    with pytest.raises(ResourceNotFound):
        other.get("Task", task_id)
    answer = requests.get(
        f"{served.url}/v1/cases/{task_id}",
        headers={"Authorization": f"Bearer {token_for(served, theirs)}"},
        timeout=10,
    )
    assert answer.status_code == 404


def test_discovery_names_the_token_endpoint(served: Served) -> None:
    found = requests.get(f"{served.fhir}/.well-known/smart-configuration", timeout=10)
    assert found.status_code == 200
    config = found.json()
    assert config["token_endpoint"] == served.token_url
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert (
        "client-confidential-asymmetric" in config["capabilities"]
        and "system/*.read" in config["scopes_supported"]
    )
    statement = CapabilityStatement.model_validate(requests.get(f"{served.fhir}/metadata", timeout=10).json())
    [rest] = statement.rest
    assert rest.security.service[0].coding[0].code == "SMART-on-FHIR"
    [uris] = rest.security.extension
    assert uris.url == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert [(e.url, e.valueUri) for e in uris.extension] == [("token", served.token_url)]


def test_registration_refuses_private_keys_and_bad_scopes_and_needs_operations(served: Served) -> None:
    partner = new_partner(served.auth, "SMART refusals")
    url = f"{served.url}/v1/partners/{partner['partner_id']}/smart-clients"
    key = new_key("ES384")
    private = jwt.algorithms.ECAlgorithm.to_jwk(key.private, as_dict=True) | {"kid": "k1"}
    cases = [
        ({"jwks": {"keys": [private]}, "scopes": "system/Task.read"}, "private key material"),
        ({"jwks": {"keys": [key.jwk()]}, "scopes": "user/*.read"}, "not a system scope"),
        ({"jwks": {"keys": []}, "scopes": "system/Task.read"}, "at least one public key"),
    ]
    for body, said in cases:
        answer = requests.post(url, json=body, headers=served.operations, timeout=10)
        assert answer.status_code == 422 and said in answer.json()["detail"], answer.text
    as_partner = requests.post(
        url, json=cases[0][0], headers={"Authorization": partner["Authorization"]}, timeout=10
    )
    assert as_partner.status_code == 403


def test_the_console_registers_a_client_whose_assertions_get_tokens(served: Served, tmp_path: Any) -> None:
    partner = new_partner(served.auth, "SMART console")
    key = new_key("RS384")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [key.jwk()]}))
    done = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "partner", "register-client", partner["partner_id"],
         "--jwks", str(tmp_path / "jwks.json"), "--scope", "system/Task.read"],
        cwd=PROJECT_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    printed = json.loads(done.stdout)
    assert printed["partner_id"] == partner["partner_id"] and printed["key_ids"] == [key.kid]
    client = Registered(printed["client_id"], partner["partner_id"], key, {})
    answer = ask_token(served, assertion(client, served.token_url), scope="system/Task.read")
    assert answer.status_code == 200 and answer.json()["scope"] == "system/Task.read"


def test_keys_rotate_without_downtime(served: Served) -> None:
    client = register(served)
    old, new = client.key, new_key("RS384")
    url = f"{served.url}/v1/partners/{client.partner_id}/smart-clients/{client.client_id}/jwks"
    both = requests.put(url, json={"keys": [old.jwk(), new.jwk()]}, headers=served.operations, timeout=10)
    assert both.status_code == 200 and both.json()["key_ids"] == [old.kid, new.kid], both.text
    assert ask_token(served, assertion(client, served.token_url)).status_code == 200
    client.key = new
    assert ask_token(served, assertion(client, served.token_url)).status_code == 200
    only_new = requests.put(url, json={"keys": [new.jwk()]}, headers=served.operations, timeout=10)
    assert only_new.status_code == 200
    client.key = old
    refused = ask_token(served, assertion(client, served.token_url))
    assert refused.json()["error"] == "invalid_client" and "kid" in refused.json()["error_description"]
    theirs = register(served)
    elsewhere = f"{served.url}/v1/partners/{theirs.partner_id}/smart-clients/{client.client_id}/jwks"
    assert (
        requests.put(elsewhere, json={"keys": [new.jwk()]}, headers=served.operations, timeout=10).status_code
        == 404
    )


@dataclass
class JwksHost:
    """A partner's key server on loopback (ENV=dev allows plain HTTP there, as for webhooks)."""

    url: str
    answers: dict[str, tuple[int, bytes, dict[str, str]]]  # path -> (status, body, headers)
    hits: list[str]


@pytest.fixture(scope="module")
def jwks_host() -> Iterator[JwksHost]:
    answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            status, body, headers = answers.get(self.path, (404, b"", {}))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield JwksHost(f"http://127.0.0.1:{server.server_address[1]}", answers, hits)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def publish(host: JwksHost, path: str, *keys: SigningKey) -> str:
    host.answers[path] = (200, json.dumps({"keys": [k.jwk() for k in keys]}).encode(), {})
    return f"{host.url}{path}"


def test_a_client_publishing_its_keys_at_a_jwks_uri_gets_tokens_and_rotates_there(
    served: Served, jwks_host: JwksHost
) -> None:
    partner = new_partner(served.auth, "SMART jwks_uri")
    old, new = new_key("ES384"), new_key("RS384")
    uri = publish(jwks_host, "/ehr/jwks.json", old)
    answer = requests.post(
        f"{served.url}/v1/partners/{partner['partner_id']}/smart-clients",
        json={"jwks_uri": uri, "scopes": "system/Task.read"},
        headers=served.operations,
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["jwks_uri"] == uri and answer.json()["key_ids"] == [old.kid]
    client = Registered(answer.json()["client_id"], partner["partner_id"], old, {})
    assert ask_token(served, assertion(client, served.token_url), scope="system/Task.read").status_code == 200

    publish(jwks_host, "/ehr/jwks.json", old, new)  # the EHR adds its next key
    client.key = new
    read = len(jwks_host.hits)
    # Read moments ago: a kid it does not know is refused without asking again (made-up kids cost nothing).
    early = ask_token(served, assertion(client, served.token_url), scope="system/Task.read")
    assert early.json()["error"] == "invalid_client" and len(jwks_host.hits) == read
    with Session(served.auth) as session:
        session.execute(
            update(SmartClient)
            .where(SmartClient.id == client.client_id)  # type: ignore[arg-type]
            .values(jwks_fetched_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        session.commit()
    later = ask_token(served, assertion(client, served.token_url), scope="system/Task.read")
    assert later.status_code == 200, later.text
    assert len(jwks_host.hits) == read + 1

    # A jku in the header must be the URL registered (SMART Backend Services); another is refused unread.
    def with_jku(jku: str) -> str:
        headers = {"kid": new.kid, "jku": jku}
        return jwt.encode(claims_of(client, served), new.private, algorithm=new.alg, headers=headers)

    same = ask_token(served, with_jku(uri), scope="system/Task.read")
    assert same.status_code == 200, same.text
    elsewhere = publish(jwks_host, "/attacker/jwks.json", new)
    refused = ask_token(served, with_jku(elsewhere), scope="system/Task.read")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_client"
    assert "jku is not the JWKS URL registered" in refused.json()["error_description"]
    assert elsewhere not in refused.text and uri not in refused.text
    assert not any("/attacker/" in hit for hit in jwks_host.hits)


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("http://10.20.30.40/jwks.json", "private, loopback or link-local"),
        ("http://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
        ("file:///etc/passwd", "must use https"),
        ("/redirect", "answered HTTP 302"),
        ("/missing", "answered HTTP 404"),
        ("/large", "more than 64 KiB"),
        ("/not-json", "did not answer JSON"),
        ("/private-key", "private key material"),
    ],
)
def test_a_jwks_uri_is_read_under_the_webhooks_ssrf_rules(
    served: Served, jwks_host: JwksHost, where: str, said: str
) -> None:
    jwks_host.answers["/redirect"] = (302, b"", {"Location": "http://10.20.30.40/jwks.json"})
    jwks_host.answers["/large"] = (200, b"{" + b" " * (70 * 1024) + b"}", {})
    jwks_host.answers["/not-json"] = (200, b"<html>", {})
    key = new_key("ES384")
    private = jwt.algorithms.ECAlgorithm.to_jwk(key.private, as_dict=True) | {"kid": "k1"}
    jwks_host.answers["/private-key"] = (200, json.dumps({"keys": [private]}).encode(), {})
    partner = new_partner(served.auth, "SMART jwks_uri refused")
    answer = requests.post(
        f"{served.url}/v1/partners/{partner['partner_id']}/smart-clients",
        json={
            "jwks_uri": where if "://" in where else f"{jwks_host.url}{where}",
            "scopes": "system/Task.read",
        },
        headers=served.operations,
        timeout=30,
    )
    assert answer.status_code == 422, answer.text
    assert said in answer.json()["detail"]  # a redirect is refused, not followed to where it points


def test_a_clients_tokens_share_one_rate_limit(served: Served, settings: Settings) -> None:
    """Rate limited as a key is: a bucket per client, whichever of its tokens is sent (a new token every
    5 minutes does not refill it); 429 with Retry-After."""
    app = intake_app(intake_engines(settings), api.router)
    bucket = RateLimiter(per_second=0.01, burst=2)
    app.dependency_overrides[rate_limiter] = lambda: bucket
    client = register(served)
    first, second = token_for(served, client), token_for(served, client)
    with TestClient(app) as limited:
        codes = [limited.get("/v1/cases", headers={"Authorization": f"Bearer {first}"}) for _ in range(2)]
        assert [c.status_code for c in codes] == [200, 200]
        spent = limited.get("/v1/cases", headers={"Authorization": f"Bearer {second}"})
        assert spent.status_code == 429 and int(spent.headers["Retry-After"]) >= 1
        other = register(served)
        fresh = limited.get("/v1/cases", headers={"Authorization": f"Bearer {token_for(served, other)}"})
        assert fresh.status_code == 200


def test_a_token_with_subscription_scopes_subscribes_and_one_without_is_told_the_scope(
    served: Served,
) -> None:
    client = register(served, scopes="system/Subscription.read system/Subscription.write system/Task.read")
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "follow our second opinions",
        "criteria": f"{served.fhir}/SubscriptionTopic/case-status",
        "channel": {
            "type": "rest-hook",
            "endpoint": "http://127.0.0.1:9/notify",
            "payload": "application/fhir+json",
        },
    }
    subscriber = token_for(served, client, scope="system/Subscription.read system/Subscription.write")
    created = fhir_client(served, subscriber).execute("Subscription", data=subscription)
    assert created["status"] == "requested"
    assert fhir_client(served, subscriber).get("Subscription", created["id"])["id"] == created["id"]
    reader = token_for(served, client, scope="system/Task.read")
    headers = {"Authorization": f"Bearer {reader}", "Content-Type": "application/fhir+json"}
    posted = requests.post(f"{served.fhir}/Subscription", json=subscription, headers=headers, timeout=10)
    assert posted.status_code == 403
    assert (
        posted.headers["WWW-Authenticate"]
        == 'Bearer error="insufficient_scope", scope="system/Subscription.write"'
    )


def test_token_requests_from_one_address_are_rate_limited_before_any_assertion_is_checked(
    served: Served, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token endpoint is open to anyone: each attempt costs a key look-up and a signature check, so an
    address asking too often is told to wait (429, Retry-After, an RFC 6749 body) before either is done."""
    app = intake_app(intake_engines(settings), smart_api.token_router)
    bucket = RateLimiter(per_second=0.01, burst=2)
    app.dependency_overrides[get_token_rate_limiter] = lambda: bucket
    app.dependency_overrides[get_settings] = lambda: settings
    checked: list[str] = []
    verify = smart.verify_assertion
    monkeypatch.setattr(smart, "verify_assertion", lambda *a, **k: checked.append("x") or verify(*a, **k))
    client = register(served)
    form = {
        "grant_type": "client_credentials",
        "scope": READ_WRITE,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    }
    with TestClient(app) as limited:
        answers = [
            limited.post(
                "/auth/token",
                data={**form, "client_assertion": assertion(client, f"{settings.intake_url}/auth/token")},
            )
            for _ in range(3)
        ]
    assert [a.status_code for a in answers[:2]] == [200, 200], answers[0].text
    refused = answers[2]
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "invalid_request"
    assert "reuse a token until it expires" in refused.json()["error_description"]
    assert refused.headers["Cache-Control"] == "no-store"
    assert len(checked) == 2  # the third assertion was never looked at
