"""The partner's, facility's, patient's, specialist's and referrer's side of a case, asynchronously, as
scripts/demo.py does it, so many cases can run at once from one process."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx
from temporalio.client import Client

from bench.status_feed import StatusFeed
from bench.system import System
from contracts.decisions import CloseCase, CostChoice, CostDecision
from scripts import demo
from services.review.directory import SpecialistIn

POLL_SECONDS = 0.2  # how often a request that is not there yet (a 404) is tried again


async def signing_headers(system: System, reviewer: str) -> dict[str, str]:
    """The specialist's own key: only it may submit the findings the report says they signed."""
    key = system.signing_keys.get(reviewer)
    if key is None:
        key = system.signing_keys[reviewer] = await asyncio.to_thread(demo.specialist_key, reviewer)
    return {"Authorization": f"Bearer {key}"}


def case_request(system: System, **exam: str) -> dict[str, Any]:
    request = dict(demo.SAMPLE_CASE, partner_id=system.partner_id)
    request["partner_case_ref"] = f"BENCH-{secrets.token_hex(8)}"
    if exam:
        request["exam"] = {**demo.SAMPLE_CASE["exam"], **exam}
    return request


async def create_case(http: httpx.AsyncClient, system: System, **exam: str) -> str:
    response = await http.post(f"{system.settings.intake_url}/v1/cases", json=case_request(system, **exam))
    if response.status_code != 201:
        raise RuntimeError(f"intake refused a case: {response.status_code} {response.text[:300]}")
    return str(response.json()["case_id"])


async def upload_study(
    http: httpx.AsyncClient,
    system: System,
    case_id: str,
    files: list[Any],
    timeout: float = 120,
    retry_seconds: float = POLL_SECONDS,
) -> dict[str, Any]:
    """POST the files once the records request has arrived (404 until then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await http.post(f"{system.settings.records_url}/v1/records/{case_id}/files", files=files)
        if response.status_code != 404:
            response.raise_for_status()
            return response.json()  # type: ignore[no-any-return]
        await asyncio.sleep(retry_seconds)
    raise RuntimeError(f"the records request for case {case_id} did not arrive within {timeout:.0f}s")


def demo_files() -> list[Any]:
    files: list[Any] = [("files", ("report.txt", demo.ORIGINAL_REPORT.encode(), "text/plain"))]
    files += [
        ("files", (name, data, "application/dicom"))
        for name, data in demo.synthetic_study(demo.SAMPLE_CASE["patient"])
    ]
    return files


async def widen_directory(http: httpx.AsyncClient, system: System, max_open_reviews: int) -> int:
    """Give every specialist room for `max_open_reviews` open reviews (the seeded directory allows 5 each,
    fewer than the cases a benchmark keeps in review at once); returns how many were updated."""
    url = f"{system.settings.review_url}/v1/specialists"
    listed = await http.get(url, headers=system.operations_headers)
    listed.raise_for_status()
    for specialist in listed.json():
        body = {k: v for k, v in specialist.items() if k in SpecialistIn.model_fields}
        body["max_open_reviews"] = max_open_reviews
        put = await http.put(f"{url}/{specialist['id']}", json=body, headers=system.operations_headers)
        put.raise_for_status()
    return len(listed.json())


class Timer:
    """System time of one case: the sum of the segments the system works, without the bots' turns."""

    def __init__(self) -> None:
        self.busy = 0.0
        self._since = 0.0

    def start(self) -> None:
        self._since = time.monotonic()

    def stop(self) -> None:
        self.busy += time.monotonic() - self._since


async def run_case(
    http: httpx.AsyncClient, temporal: Client, system: System, files: list[Any], feed: StatusFeed
) -> float:
    """One case from request to closed; returns the seconds the system worked (human turns excluded).
    The bots act when the partner's webhook says the case is ready for them."""
    review_url = system.settings.review_url
    timer = Timer()
    timer.start()
    case_id = await create_case(http, system)
    await feed.wait_for(case_id, "awaiting_records")
    await upload_study(http, system, case_id, files, retry_seconds=0.05)
    await feed.wait_for(case_id, "awaiting_patient_decision")
    timer.stop()
    handle = temporal.get_workflow_handle(f"case-{case_id}")
    await handle.execute_update(
        "decide_cost", CostDecision(choice=CostChoice.ACCEPT, by="bench-patient", reason="benchmark")
    )
    timer.start()
    await feed.wait_for(case_id, "awaiting_acceptance", timeout=180)
    timer.stop()
    review = await handle.query("review")
    if not review:
        raise RuntimeError(f"case {case_id} awaits acceptance but its review query names no specialist")
    review = review.model_dump() if hasattr(review, "model_dump") else review
    reviewer, review_id = review["reviewer_id"], review["review_id"]
    acting = {"reviewer": reviewer}
    if not review["accepted"]:
        accepted = await http.post(
            f"{review_url}/v1/reviews/{review_id}/accept", params=acting, headers=system.operations_headers
        )
        accepted.raise_for_status()
        timer.start()
        await feed.wait_for(case_id, "in_review")
        timer.stop()
    submitted = await http.post(
        f"{review_url}/v1/reviews/{review_id}",
        json=demo.FINDINGS,
        headers=await signing_headers(system, reviewer),
    )
    submitted.raise_for_status()
    timer.start()
    await feed.wait_for(case_id, "follow_up")
    timer.stop()
    await handle.execute_update("close", CloseCase(by="bench-referrer", reason="no further questions"))
    timer.start()
    await feed.wait_for(case_id, "closed")
    timer.stop()
    return timer.busy
