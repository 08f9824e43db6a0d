"""What no service can take is refused before the endpoint runs: a body over the service's bound (the ingress
lets records' uploads through) is a 413 problem, declared or counted as it streams; a JSON text with a NUL
character, which PostgreSQL cannot store, is a 422. The handler never sees either."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError

from services.common import http
from services.common.http import create_app

LIMIT = 64 * 1024
seen: list[int] = []
router = APIRouter()


@router.post("/v1/parse")
def parse(body: dict[str, str] | list[str]) -> dict[str, bool]:
    return {"parsed": True}


@router.post("/v1/echo")
@router.post("/fhir/Echo")
async def echo(request: Request) -> dict[str, int]:
    size = len(await request.body())
    seen.append(size)
    return {"size": size}


def client() -> TestClient:
    return TestClient(create_app("bodytest", routers=[router], engine=lambda: None, max_body_bytes=LIMIT))  # type: ignore[arg-type,return-value]


def chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 4096):
        yield b"x" * 4096


def test_a_body_within_the_bound_is_served() -> None:
    assert client().post("/v1/echo", content=b"x" * LIMIT).json() == {"size": LIMIT}


def test_a_declared_body_over_the_bound_is_a_413_problem_before_it_is_read() -> None:
    seen.clear()
    response = client().post("/v1/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith(
        "the request body is larger than the 64 KiB this service takes"
    )
    assert response.json()["detail"].endswith("nothing was stored")
    assert seen == []


def test_a_chunked_body_is_refused_once_it_passes_the_bound() -> None:
    seen.clear()
    response = client().post("/v1/echo", content=chunks(4 * LIMIT))  # no Content-Length: counted as it comes
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert seen == []


def test_on_the_fhir_paths_the_refusal_is_an_operation_outcome() -> None:
    for body in (b"x" * (LIMIT + 1), chunks(4 * LIMIT)):
        response = client().post("/fhir/Echo", content=body)
        assert response.status_code == 413
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "too-costly"


def test_a_nul_character_in_a_json_text_is_a_422_naming_the_field_before_the_endpoint_runs() -> None:
    seen.clear()
    body = {"patient": {"family_name": "Doe"}, "history": ["prior scan", "mass\u0000 left ovary"]}
    response = client().post("/v1/echo", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith("a text of the request holds a NUL character")
    assert response.json()["errors"] == [
        {
            "field": "history.1",
            "message": "holds a NUL character (\\u0000), which cannot be stored; remove it",
        }
    ]
    assert "ovary" not in response.text and "Doe" not in response.text
    assert seen == []


def test_a_nul_escape_split_across_chunks_is_found_and_an_escaped_backslash_is_not_one() -> None:
    seen.clear()
    split = iter([b'{"a": "x\\u00', b'00"}'])
    response = client().post("/v1/echo", content=split, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "a"
    literal = {"note": "the text \\u0000 as typed"}  # a backslash, then "u0000": no NUL
    assert client().post("/v1/echo", json=literal).status_code == 200
    bundle = {"resourceType": "Bundle", "entry": [{"resource": {"identifier": [{"value": "S-\u0000"}]}}]}
    outcome = (
        client().post("/fhir/Echo", json=bundle, headers={"Content-Type": "application/fhir+json"}).json()
    )
    assert outcome["issue"][0]["code"] == "invalid"
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.identifier[0].value"]


def test_a_json_body_is_handed_on_whole_and_a_chunked_one_is_bounded() -> None:
    body = json.dumps({"text": "x" * 40_000}).encode()
    pieces = iter([body[:10_000], body[10_000:]])
    response = client().post("/v1/echo", content=pieces, headers={"Content-Type": "application/json"})
    assert response.json() == {"size": len(body)}
    endless = (b'{"a": "' + b"x" * 4096 for _ in range(100))
    response = client().post("/v1/echo", content=endless, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_bodies_that_are_not_json_are_not_read_for_nul() -> None:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n\\u0000\r\n--b--\r\n"
    response = client().post(
        "/v1/echo", content=body, headers={"Content-Type": "multipart/related; boundary=b"}
    )
    assert response.json() == {"size": len(body)}


def test_a_value_the_database_cannot_store_is_a_422_not_a_500() -> None:
    """The net behind the guard: a DataError (the transaction rolled back) says to fix the value."""
    failing = APIRouter()

    @failing.post("/v1/store")
    def store() -> None:
        raise DataError(
            "INSERT …", {"family_name": "Doe"}, Exception("integer out of range"), hide_parameters=True
        )

    response = TestClient(create_app("bodytest", routers=[failing], engine=lambda: None)).post("/v1/store")  # type: ignore[arg-type,return-value]
    assert response.status_code == 422
    assert response.json()["detail"].endswith("fix it and send the request again; nothing was stored.")
    assert "Doe" not in response.text and "integer out of range" not in response.text


def test_escaped_backslashes_are_no_nul_however_many() -> None:
    """Each `\\\\u0000` (an escaped backslash, then "u0000") is text, not NUL; read in one pass."""
    body = b'{"note": "' + b"\\\\u0000" * 9000 + b'"}'
    response = client().post("/v1/echo", content=body, headers={"Content-Type": "application/json"})
    assert response.json() == {"size": len(body)}


def test_a_service_without_an_app_wide_bound_still_reads_no_json_body_over_the_json_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records bounds its uploads per route; a JSON body is read whole before any route, so it is bounded."""
    monkeypatch.setattr(http, "MAX_JSON_BODY_BYTES", LIMIT)
    unbounded = TestClient(create_app("bodytest", routers=[router], engine=lambda: None, max_body_bytes=None))  # type: ignore[arg-type,return-value]
    endless = (b'{"a": "' + b"x" * 4096 for _ in range(100))
    response = unbounded.post("/v1/echo", content=endless, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert unbounded.post("/v1/echo", content=b"x" * (4 * LIMIT)).json() == {"size": 4 * LIMIT}  # not JSON


def test_a_deeply_nested_body_with_a_nul_is_refused_not_a_500() -> None:
    """Too deep for Python's JSON parser to read: the guard cannot name the field, the endpoint refuses it."""
    body = b"[" * 5000 + b'"\\u0000"' + b"]" * 5000
    response = client().post("/v1/parse", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert response.headers["content-type"].startswith("application/problem+json")
