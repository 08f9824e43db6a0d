"""`import`: upload of a 1 GB synthetic ultrasound study as a ZIP to the records service (MB/s, peak RSS of
the records process) vs `sha256sum` of the same bytes; and a 250 MB import's peak RSS.

The ZIP goes as the request body (`POST /v1/records/{case}/archive`, expanded while it arrives), the way
a hospital's integration sends a CD; the same ZIP as multipart form data (`/files`, spooled by the web
server first) is timed too and shown beside it."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx

from bench.cases import POLL_SECONDS, create_case
from bench.result import Result
from bench.studies import zipped_study
from bench.system import PeakRss, System

TARGET, RSS_LIMIT, RSS_GROWTH = 0.5, 300 * 1024**2, 0.2
MB = 1_000_000


def open_case(system: System) -> str:
    async def create() -> str:
        async with httpx.AsyncClient(timeout=60, headers=system.headers) as http:
            return await create_case(http, system)

    return asyncio.run(create())


def upload(system: System, case_id: str, archive: Path, *, multipart: bool = False) -> tuple[float, int, int]:
    """Seconds for the upload and the records process's peak RSS (itself, and with its children)."""
    records = f"{system.settings.records_url}/v1/records/{case_id}"
    with httpx.Client(timeout=1800, headers=system.headers) as http:
        deadline = time.monotonic() + 120
        while http.get(records).status_code == 404:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no records request for case {case_id} after 120 s")
            time.sleep(POLL_SECONDS)
        with archive.open("rb") as stream, PeakRss(system.pid("records")) as rss:
            started = time.monotonic()
            if multipart:
                response = http.post(
                    f"{records}/files", files=[("files", (archive.name, stream, "application/zip"))]
                )
            else:
                zip_body = {"Content-Type": "application/zip"}
                response = http.post(f"{records}/archive", content=stream, headers=zip_body)
            seconds = time.monotonic() - started
    if response.status_code != 201:
        raise RuntimeError(f"records refused the study: {response.status_code} {response.text[:300]}")
    return seconds, rss.peak, rss.tree_peak


def sha256sum_seconds(path: Path) -> float:
    started = time.monotonic()
    subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)
    return time.monotonic() - started


def measure(system: System, large: int, small: int) -> Result:
    small_zip = zipped_study(system.scratch / "small", small)
    _, small_peak, _ = upload(system, open_case(system), small_zip)
    small_zip.unlink()
    large_zip = zipped_study(system.scratch / "large", large)
    size = large_zip.stat().st_size
    seconds, peak, tree_peak = upload(system, open_case(system), large_zip)
    ceiling_seconds = sha256sum_seconds(large_zip)
    multipart_seconds, _, _ = upload(system, open_case(system), large_zip, multipart=True)
    rate, ceiling = size / MB / seconds, size / MB / ceiling_seconds
    ratio = rate / ceiling
    growth = peak / small_peak - 1
    ok = ratio >= TARGET and peak < RSS_LIMIT and growth <= RSS_GROWTH
    return Result(
        name="import",
        what=f"upload of a {size / MB:.0f} MB ZIP study",
        ceiling="sha256sum of the same bytes",
        ratio=ratio,
        target=f">={TARGET}, RSS<300MB, <=+20% of {small / MB:.0f} MB's",
        ok=ok,
        figures={
            "MB/s": round(rate, 1),
            "ceiling MB/s": round(ceiling, 1),
            "multipart MB/s": round(size / MB / multipart_seconds, 1),
            "peak RSS MB": round(peak / MB),
            f"{small / MB:.0f} MB import peak RSS MB": round(small_peak / MB),
            "peak RSS with children MB": round(tree_peak / MB),
        },
    )


def run(system: System, *, smoke: bool) -> Result:
    if smoke:
        return measure(system, large=8 * 1024**2, small=2 * 1024**2)
    return measure(system, large=1000 * MB, small=250 * MB)
