"""Every service bounds its own request bodies (the ingress lets records' uploads through): a body over the
bound is a 413 problem, declared or counted as it streams, and the handler never sees it."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.testclient import TestClient

from services.common.http import create_app

LIMIT = 64 * 1024
seen: list[int] = []
router = APIRouter()


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
