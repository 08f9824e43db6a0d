"""What no service can take is refused before the endpoint runs: a body over the service's bound (the ingress
lets records' uploads through) is a 413 problem, declared or counted as it streams; a JSON text with a NUL
character, which PostgreSQL cannot store, is a 422. The handler never sees either."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel
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


def test_a_lone_surrogate_escape_in_a_json_text_is_a_422_naming_the_field_and_a_pair_is_stored() -> None:
    """A lone `\\ud800` decodes to a text PostgreSQL (and UTF-8) cannot take: it was a 500 wherever a handler
    read the JSON itself (a Bundle entry's ifNoneExist) rather than through a pydantic string."""
    seen.clear()
    body = b'{"entry": [{"request": {"ifNoneExist": "identifier=\\ud800"}}]}'
    response = client().post("/v1/echo", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("a text of the request holds a lone surrogate escape")
    assert response.json()["errors"][0]["field"] == "entry.0.request.ifNoneExist"
    assert "UTF-8" in response.json()["errors"][0]["message"] and "identifier=" not in response.text
    outcome = client().post(
        "/fhir/Echo", content=b'{"resourceType": "Bundle", "id": "\\uDC00"}',
        headers={"Content-Type": "application/fhir+json"},
    ).json()  # fmt: skip
    assert outcome["issue"][0]["expression"] == ["Bundle.id"]
    assert seen == []
    pair = b'{"note": "\\ud83d\\ude00 and \\\\ud800 as typed"}'  # an emoji, then a backslash and "ud800"
    response = client().post("/v1/echo", content=pair, headers={"Content-Type": "application/json"})
    assert response.json() == {"size": len(pair)}


def test_a_nul_escape_in_json_nested_too_deep_to_read_is_handed_on_not_a_500() -> None:
    deep = b'{"a": "\\u0000", "b": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    response = client().post("/v1/echo", content=deep, headers={"Content-Type": "application/json"})
    assert response.json() == {"size": len(deep)}  # the endpoint's own parsing answers for it


class Note(BaseModel):
    text: str


@router.post("/v1/notes")
def add_note(note: Note) -> dict[str, str]:
    return {"text": note.text}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"text": "\xff"}', "the body is not UTF-8 text"),
        (b"[" * 5_000 + b"]" * 5_000, "the body nests arrays or objects too deeply"),
        (
            b'{"text": "x", "n": ' + b"9" * 5_000 + b"}",
            "the body holds a number with more digits than can be read",
        ),
    ],
    ids=["not UTF-8", "nested too deep", "a number of 5000 digits"],
)
def test_a_json_body_that_cannot_be_decoded_says_why(body: bytes, detail: str) -> None:
    response = client().post("/v1/notes", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(detail)
    assert response.json()["detail"].endswith("nothing was stored")


@router.get("/v1/things/{thing_id}")
@router.get("/fhir/Thing/{thing_id}")
def read_thing(thing_id: str, name: str | None = None) -> dict[str, str]:
    raise DataError("SELECT …", {"id": thing_id}, Exception("NUL"), hide_parameters=True)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("/v1/things/a%00b", "path"),
        ("/v1/things/a?name=x%00y", "query.name"),
        ("/v1/things/a?x%00=1", "query.x"),
    ],
)
def test_a_nul_character_in_the_url_is_a_422_naming_where_before_the_endpoint_runs(
    url: str, where: str
) -> None:
    """Before: the look-up failed in the database, answered "cannot be stored ... nothing was stored" on a read."""
    response = client().get(url)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "field": where,
            "message": "holds a NUL character (%00), which no id or search value holds; remove it",
        }
    ]
    outcome = client().get("/fhir/Thing/%00").json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["expression"] == ["path"]


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_a_body_with_escapes_is_read_and_walked_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading and walking a body of tens of MB on the event loop held every other request that long."""
    where: list[bool] = []
    walk = http.unstorable_field

    def spy(document: Any, fhir: bool) -> Any:
        where.append(on_event_loop())
        return walk(document, fhir)

    monkeypatch.setattr(http, "unstorable_field", spy)
    response = client().post(
        "/v1/echo", content=b'{"a": "\\u0000"}', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422 and where == [False]


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


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_a_json_body_sent_without_a_json_content_type_is_told_to_send_one(content_type: str | None) -> None:
    """It is not read as JSON; the error on the whole body only said "Input should be a valid dictionary"."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = client().post("/v1/notes", content=b'{"text": "a note"}', headers=headers)
    assert response.status_code == 422
    assert (
        response.json()["detail"]
        == "The body was not read as JSON: send it with Content-Type: application/json."
    )
    as_json = client().post("/v1/notes", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert as_json.json()["detail"] == "The request does not match the schema; fix the fields listed."


def test_a_fhir_body_without_a_content_type_is_looked_at_as_json() -> None:
    """The FHIR endpoints read such a body as JSON: a NUL in it passed the guard into a case."""
    body = b'{"resourceType": "Bundle", "entry": [{"resource": {"id": "x\\u0000"}}]}'
    outcome = client().post("/fhir/Echo", content=body).json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.id"]
    assert client().post("/v1/echo", content=body).json() == {"size": len(body)}  # not JSON, not read
