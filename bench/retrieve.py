"""`retrieve`: C-GET of a 500 MB study from Orthanc (the facility's PACS) into the records service vs dcmtk
`getscu` of the same study from the same Orthanc."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx

from bench.cases import create_case
from bench.result import Result
from bench.studies import clips
from bench.system import System
from services.records.retrieval import RetrievalSettings
from tests.orthanc import Orthanc, running_orthanc

TARGET = 0.8
ROUNDS = 5
MB = 1_000_000
STATUS_POLL_SECONDS = 0.5  # records' own clock times the retrieval; polling only finds it done
# Both sides use Orthanc's largest PDU (its default is 16 KiB): getscu asks for it with -pdu, records
# accepts up to the same. Fewer, larger PDUs cost a Python DICOM stack far less than a C one.
PDU_BYTES = 131072


def load(orthanc: Orthanc, files: list[Path]) -> None:
    command = ["storescu", "-aec", orthanc.ae_title, "-aet", "MODALITY", "127.0.0.1", str(orthanc.dicom_port)]
    subprocess.run([*command, *map(str, files)], check=True, capture_output=True, timeout=600)


def getscu_seconds(orthanc: Orthanc, accession: str, into: Path) -> float:
    into.mkdir()
    command = [
        "getscu",
        "-pdu",
        str(PDU_BYTES),
        "-aet",
        "GETSCU",
        "-aec",
        orthanc.ae_title,
        "127.0.0.1",
        str(orthanc.dicom_port),
    ]
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"AccessionNumber={accession}", "-od", str(into)]
    started = time.monotonic()
    subprocess.run([*command, *query], check=True, capture_output=True, timeout=600)
    seconds = time.monotonic() - started
    if not any(into.iterdir()):
        raise RuntimeError("getscu retrieved nothing; the ceiling would be meaningless")
    return seconds


async def retrieval_seconds(system: System, orthanc: Orthanc, accession: str) -> tuple[float, float]:
    """Seconds of the retrieval itself, by records' own clock (from claiming it to done: C-FIND, C-GET,
    storing and indexing the instances), and seconds from the case's creation until it was seen done
    (adding the workflow and records.collect, after which the retrieval loop is woken)."""
    records = system.settings.records_url
    async with httpx.AsyncClient(timeout=60, headers=system.headers) as http:
        source = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
        put = await http.put(
            f"{records}/v1/records/sources/{system.partner_id}", json=source | {"retrieve_method": "c-get"}
        )
        put.raise_for_status()
        created = time.monotonic()
        case_id = await create_case(http, system, accession_number=accession)
        while time.monotonic() - created < 1200:
            response = await http.get(f"{records}/v1/records/{case_id}")
            retrievals = response.json().get("retrievals", []) if response.status_code == 200 else []
            if retrievals and retrievals[0]["status"] == "done":
                took = datetime.fromisoformat(retrievals[0]["finished_at"]) - datetime.fromisoformat(
                    retrievals[0]["started_at"]
                )
                return took.total_seconds(), time.monotonic() - created
            if retrievals and retrievals[0]["status"] == "failed":
                raise RuntimeError(f"the retrieval failed: {retrievals[0]['last_error']}")
            await asyncio.sleep(STATUS_POLL_SECONDS)
    raise RuntimeError("the retrieval did not finish within 20 minutes")


def measure(system: System, size: int, rounds: int) -> Result:
    """`rounds` rounds, each getscu then records on a new case, side by side; the medians are compared, so
    one round slowed by a neighbour on this shared machine does not decide the ratio."""
    accession = f"BENCH{secrets.token_hex(4).upper()}"
    files = clips(system.scratch / "pacs-study", size, accession_number=accession)
    total = sum(f.stat().st_size for f in files)
    ceilings: list[float] = []
    retrievals: list[tuple[float, float]] = []
    with running_orthanc(
        system.scratch / "orthanc", scp_port=RetrievalSettings().scp_port, maximum_pdu_length=PDU_BYTES
    ) as orthanc:
        load(orthanc, files)
        for f in files:
            f.unlink()
        for n in range(rounds):
            into = system.scratch / f"getscu-{n}"
            ceilings.append(getscu_seconds(orthanc, accession, into))
            shutil.rmtree(into)
            retrievals.append(asyncio.run(retrieval_seconds(system, orthanc, accession)))
    seconds = statistics.median(r[0] for r in retrievals)
    ceiling_seconds = statistics.median(ceilings)
    rate, ceiling = total / MB / seconds, total / MB / ceiling_seconds
    ratio = rate / ceiling
    return Result(
        name="retrieve",
        what=f"C-GET of a {total / MB:.0f} MB study from Orthanc into records, median of {rounds} rounds",
        ceiling="dcmtk getscu of the same study, in the same rounds",
        ratio=ratio,
        target=f">={TARGET}",
        ok=ratio >= TARGET,
        figures={
            "MB/s": round(rate, 1),
            "ceiling MB/s": round(ceiling, 1),
            "seconds": round(seconds, 2),
            "seconds from case creation": round(statistics.median(r[1] for r in retrievals), 2),
            "round ratios": " ".join(f"{c / r[0]:.2f}" for c, r in zip(ceilings, retrievals, strict=True)),
        },
        notes=[
            "records' time runs from claiming the retrieval (then C-FIND, C-GET, storing, indexing) to done; "
            "from the case's creation it adds the workflow and records.collect (the loop is woken at once)",
            "each round runs getscu, then records on a new case; the ratio is of the medians",
        ],
    )


def run(system: System, *, smoke: bool) -> Result:
    return measure(system, size=4 * 1024**2 if smoke else 500 * MB, rounds=1 if smoke else ROUNDS)
