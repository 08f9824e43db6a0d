"""Each request is counted by its route template and status, never by its path (paths hold case ids)."""

from fastapi import APIRouter
from fastapi.testclient import TestClient

from services.common.http import create_app

router = APIRouter()


@router.get("/things/{thing_id}")
def get_thing(thing_id: str) -> dict[str, str]:
    return {"thing_id": thing_id}


@router.get("/broken")
def broken() -> None:
    raise RuntimeError("a bug")


def count(metrics: str, route: str, status: str) -> float:
    labels = f'method="GET",route="{route}",service="metrics-test",status="{status}"'
    line = next(
        (m for m in metrics.splitlines() if m.startswith("http_requests_total{") and labels in m), None
    )
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_requests_are_counted_by_route_template_and_status() -> None:
    app = create_app("metrics-test", routers=[router], engine=lambda: None)  # type: ignore[arg-type,return-value]
    with TestClient(app, raise_server_exceptions=False) as client:
        before = client.get("/metrics").text
        assert client.get("/things/case-123").status_code == 200
        assert client.get("/things/case-456").status_code == 200
        assert client.get("/broken").status_code == 500
        assert client.get("/nowhere").status_code == 404
        after = client.get("/metrics").text
    assert count(after, "/things/{thing_id}", "200") - count(before, "/things/{thing_id}", "200") == 2
    assert count(after, "/broken", "500") - count(before, "/broken", "500") == 1
    assert count(after, "unmatched", "404") - count(before, "unmatched", "404") == 1
    assert "case-123" not in after
