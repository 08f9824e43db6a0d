"""`retrieve`: C-GET of a 500 MB study from Orthanc (the facility's PACS) into the records service vs dcmtk
`getscu` of the same study from the same Orthanc."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from bench.cases import POLL_SECONDS, create_case
from bench.result import Result
from bench.studies import clips
from bench.system import System
from services.records.retrieval import RetrievalSettings
from tests.orthanc import Orthanc, running_orthanc

TARGET = 0.8
MB = 1_000_000


def load(orthanc: Orthanc, files: list[Path]) -> None:
    command = ["storescu", "-aec", orthanc.ae_title, "-aet", "MODALITY", "127.0.0.1", str(orthanc.dicom_port)]
    subprocess.run([*command, *map(str, files)], check=True, capture_output=True, timeout=600)


def getscu_seconds(orthanc: Orthanc, accession: str, into: Path) -> float:
    into.mkdir()
    command = ["getscu", "-aet", "GETSCU", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port)]
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"AccessionNumber={accession}", "-od", str(into)]
    started = time.monotonic()
    subprocess.run([*command, *query], check=True, capture_output=True, timeout=600)
    seconds = time.monotonic() - started
    if not any(into.iterdir()):
        raise RuntimeError("getscu retrieved nothing; the ceiling would be meaningless")
    return seconds


async def retrieval_seconds(system: System, orthanc: Orthanc, accession: str) -> float:
    """From the case's creation until records reports its retrieval done."""
    records = system.settings.records_url
    async with httpx.AsyncClient(timeout=60, headers=system.headers) as http:
        source = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
        put = await http.put(
            f"{records}/v1/records/sources/{system.partner_id}", json=source | {"retrieve_method": "c-get"}
        )
        put.raise_for_status()
        started = time.monotonic()
        case_id = await create_case(http, system, accession_number=accession)
        while time.monotonic() - started < 1200:
            response = await http.get(f"{records}/v1/records/{case_id}")
            retrievals = response.json().get("retrievals", []) if response.status_code == 200 else []
            if retrievals and retrievals[0]["status"] == "done":
                return time.monotonic() - started
            if retrievals and retrievals[0]["status"] == "failed":
                raise RuntimeError(f"the retrieval failed: {retrievals[0]['last_error']}")
            await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError("the retrieval did not finish within 20 minutes")


def measure(system: System, size: int) -> Result:
    accession = f"BENCH{secrets.token_hex(4).upper()}"
    files = clips(system.scratch / "pacs-study", size, accession_number=accession)
    total = sum(f.stat().st_size for f in files)
    with running_orthanc(system.scratch / "orthanc", scp_port=RetrievalSettings().scp_port) as orthanc:
        load(orthanc, files)
        for f in files:
            f.unlink()
        ceiling_seconds = getscu_seconds(orthanc, accession, system.scratch / "getscu")
        seconds = asyncio.run(retrieval_seconds(system, orthanc, accession))
    rate, ceiling = total / MB / seconds, total / MB / ceiling_seconds
    ratio = rate / ceiling
    return Result(
        name="retrieve",
        what=f"C-GET of a {total / MB:.0f} MB study from Orthanc into records",
        ceiling="dcmtk getscu of the same study",
        ratio=ratio,
        target=f">={TARGET}",
        ok=ratio >= TARGET,
        figures={"MB/s": round(rate, 1), "ceiling MB/s": round(ceiling, 1), "seconds": round(seconds, 1)},
        notes=[
            "records' time runs from the case's creation (workflow start, records.collect, C-FIND) to done"
        ],
    )


def run(system: System, *, smoke: bool) -> Result:
    return measure(system, size=4 * 1024**2 if smoke else 500 * MB)
