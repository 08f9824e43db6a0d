"""One sample case end to end on the running stack: request, records upload, specialist review, report.

    python -m scripts.demo        (make demo starts the stack first)

Acts as the hospital (POST /v1/cases with the demo clinic's API key, and its HL7 interface engine: an MLLP
listener on loopback, registered as the clinic's HL7 endpoint, that takes the report as ORU^R01), the referring
facility (uploads a synthetic ultrasound study and the first report), the patient (accepts the cost estimate),
the specialist (accepts the offer and reviews through the API) and the referring physician (no further
questions). Prints where the report is; the last line is `case_id=<id>`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import hl7
import hl7.mllp
import httpx
import pydicom.uid

from contracts.decisions import CloseCase, CostChoice, CostDecision
from scripts import stack
from scripts.synthetic_study import make_us_instance
from services.common.config import Settings, get_settings
from services.common.temporal import connect_temporal

SAMPLE_CASE: dict[str, Any] = {
    "partner_id": "demo-clinic",
    "patient": {
        "family_name": "Sample",
        "given_name": "Dana",
        "birth_date": "1979-06-14",
        "sex": "female",
        "mrn": "DEMO-0001",
        "state": "CA",
    },
    "referring": {"name": "Dr. Alex Kim", "npi": "1234567893", "organization": "Bayview Women's Clinic"},
    "exam": {"exam_type": "pelvic", "performed_on": "2026-11-20", "facility": "Bayview Imaging"},
    "clinical_question": "Complex left adnexal mass: benign or suspicious for malignancy?",
    "reason": "possible_malignancy",
    "coverage": {"plan_code": "ACME-PPO", "member_id": "W123456789"},
}

ORIGINAL_REPORT = (
    "PELVIC ULTRASOUND, transabdominal and transvaginal.\n"
    "FINDINGS: Left ovary contains a 4.2 cm complex cystic mass with a thin septation and no solid component. "
    "No internal vascularity on colour Doppler. Right ovary normal. Uterus normal. No free fluid.\n"
    "IMPRESSION: Complex left adnexal cyst, indeterminate. Consider surgical evaluation."
)

FINDINGS = {
    "technical_quality": "diagnostic",
    "technical_notes": "Cine sweep through the left ovary is adequate; calibrated measurements present.",
    "agreement": "minor_discrepancy",
    "findings": "4.2 cm left ovarian cyst with a single thin septation, no solid component, no flow.",
    "impression": "O-RADS US 3: low risk of malignancy. Most consistent with a haemorrhagic or septated "
    "functional cyst.",
    "alternative_diagnoses": ["haemorrhagic cyst", "cystadenoma"],
    "recommendations": ["repeat ultrasound in 8-12 weeks", "no surgery on the strength of the first scan"],
    "new_ultrasound_needed": True,
}


def demo_partner(settings: Settings) -> dict[str, str]:
    """The demo clinic's credentials: made once with `secondopinion partner create`, kept in .data."""
    path = settings.data_dir / "demo-partner.json"
    if path.exists():
        credentials: dict[str, str] = json.loads(path.read_text())
        probe = httpx.get(
            f"{settings.intake_url}/v1/cases",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {credentials['api_key']}"},
        )
        if probe.status_code != 401:
            return credentials
    partner_id = "demo-clinic"
    for _ in range(5):
        command = [sys.executable, "-m", "services.common.cli", "partner", "create", "--name", "Demo clinic"]
        created = subprocess.run([*command, "--partner-id", partner_id], capture_output=True, text=True)
        if created.returncode == 0:
            break
        partner_id = f"demo-clinic-{secrets.token_hex(3)}"  # a clinic whose stored key was lost
    else:
        raise SystemExit(f"could not create the demo partner: {created.stderr or created.stdout}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(created.stdout)
    path.chmod(0o600)
    return json.loads(created.stdout)  # type: ignore[no-any-return]


class InterfaceEngine:
    """The clinic's HL7 interface engine (what Mirth or Rhapsody is at a hospital): an MLLP listener on loopback
    (over TLS with `tls`) that keeps each message it is sent and acknowledges it with AA."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[hl7.Message] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-mllp", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            hl7.mllp.start_hl7_server(
                self._serve, "127.0.0.1", 0, encoding="utf-8", limit=64 * 1024 * 1024, ssl=tls
            ),
            self._loop,
        ).result(10)

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def register_engine(http: httpx.Client, settings: Settings, partner_id: str, engine: InterfaceEngine) -> str:
    """The engine as the clinic's only HL7 endpoint (the listeners of earlier runs are gone: theirs disabled)."""
    endpoints = f"{settings.intake_url}/v1/partners/{partner_id}/hl7-endpoints"
    listed = http.get(endpoints)
    listed.raise_for_status()
    for stale in listed.json():
        if stale["enabled"]:
            http.delete(f"{endpoints}/{stale['endpoint_id']}").raise_for_status()
    body = {"host": "127.0.0.1", "port": engine.port, "tls": False, "receiving_application": "RIS",
            "receiving_facility": "BAYVIEW", "description": "demo: the clinic's interface engine"}  # fmt: skip
    registered = http.post(endpoints, json=body)
    if registered.status_code != 201:
        raise SystemExit(
            f"intake refused the clinic's HL7 endpoint: {registered.status_code} {registered.text}"
        )
    return str(registered.json()["endpoint_id"])


def oru_pdf(message: hl7.Message) -> bytes:
    """The signed PDF an ORU^R01 carries (its ED OBX: ^application^pdf^Base64^…)."""
    [encapsulated] = [obx for obx in message.segments("OBX") if str(obx[2]) == "ED"]
    return base64.b64decode(str(encapsulated[5][0][4]))


def wait_until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise SystemExit(
        f"timed out after {timeout:.0f}s waiting for {what}; `python -m scripts.stack status` and .data/logs"
    )


def synthetic_study(patient: dict[str, str]) -> list[tuple[str, bytes]]:
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    dicom_name = f"{patient['family_name'].upper()}^{patient['given_name'].upper()}"
    common: dict[str, Any] = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "patient_name": dicom_name,
        "patient_id": patient["mrn"],
        "birth_date": patient["birth_date"].replace("-", ""),
        "sex": "F",
    }
    return [
        ("IM0001.dcm", make_us_instance(None, frames=1, **common)),
        ("IM0002.dcm", make_us_instance(None, frames=1, **common)),
        ("CINE0001.dcm", make_us_instance(None, frames=12, **common)),
    ]


def case_status(http: httpx.Client, settings: Settings, case_id: str) -> dict[str, Any]:
    response = http.get(f"{settings.intake_url}/v1/cases/{case_id}")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def upload_records(http: httpx.Client, settings: Settings, case_id: str) -> dict[str, Any]:
    files = [("files", ("report.txt", ORIGINAL_REPORT.encode(), "text/plain"))]
    files += [
        ("files", (name, data, "application/dicom")) for name, data in synthetic_study(SAMPLE_CASE["patient"])
    ]

    def attempt() -> dict[str, Any] | None:
        response = http.post(f"{settings.records_url}/v1/records/{case_id}/files", files=files)
        if response.status_code == 404:  # the records request is still on its way
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    return wait_until("the records request to reach the records service", attempt, timeout=60)  # type: ignore[no-any-return]


async def workflow_call(settings: Settings, case_id: str, action: str, argument: Any = None) -> Any:
    """Operations' and the patient's side of the case, through the Temporal client (as the UI would)."""
    client = await connect_temporal(settings)
    handle = client.get_workflow_handle(f"case-{case_id}")
    if action == "query":
        return await handle.query(argument)
    return await handle.execute_update(action, argument)


def current_review(settings: Settings, case_id: str) -> dict[str, Any] | None:
    review = asyncio.run(workflow_call(settings, case_id, "query", "review"))
    return review.model_dump() if hasattr(review, "model_dump") else review


def specialist_key(reviewer: str) -> str:
    """A key acting as `reviewer`, as an operator issues one: `secondopinion key create --role specialist`."""
    command = [sys.executable, "-m", "services.common.cli", "key", "create", "--role", "specialist"]
    created = subprocess.run([*command, "--specialist-id", reviewer], capture_output=True, text=True)
    if created.returncode != 0:
        raise SystemExit(f"could not create the specialist's key: {created.stderr or created.stdout}")
    return str(json.loads(created.stdout)["api_key"])


def review_as_specialist(partner: httpx.Client, settings: Settings, case_id: str) -> str:
    review = wait_until("a specialist to be offered the case", lambda: current_review(settings, case_id))
    reviewer, review_id = review["reviewer_id"], review["review_id"]
    key = specialist_key(reviewer)
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
        if not review["accepted"]:
            http.post(
                f"{settings.review_url}/v1/reviews/{review_id}/accept", params={"reviewer": reviewer}
            ).raise_for_status()
            wait_until(
                "the review to start",
                lambda: case_status(partner, settings, case_id)["status"] == "in_review",
            )
        worklist = http.get(f"{settings.review_url}/v1/reviews", params={"reviewer": reviewer}).json()
        assert any(item["review_id"] == review_id for item in worklist), (
            "the case must be on the specialist's worklist"
        )
        detail = http.get(f"{settings.review_url}/v1/reviews/{review_id}").json()
        assert detail["original_report"]["text"].startswith("PELVIC ULTRASOUND"), (
            "the reviewer must see the first report"
        )
        http.post(f"{settings.review_url}/v1/reviews/{review_id}", json=FINDINGS).raise_for_status()
    return str(reviewer)


def run_case(
    settings: Settings, *, echo: Callable[[str], None] = print, engine: InterfaceEngine | None = None
) -> str:
    """The sample case from request to closed, acting as hospital, facility, patient, specialist, referrer;
    the clinic's interface engine is `engine` (one of its own, closed at the end, when not given)."""
    own = engine is None
    engine = engine or InterfaceEngine()
    try:
        return _run_case(settings, echo, engine)
    finally:
        if own:
            engine.close()


def _run_case(settings: Settings, echo: Callable[[str], None], engine: InterfaceEngine) -> str:
    partner = demo_partner(settings)
    request = dict(
        SAMPLE_CASE, partner_id=partner["partner_id"], partner_case_ref=f"ORDER-{secrets.token_hex(4)}"
    )
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {partner['api_key']}"}) as http:
        endpoint_id = register_engine(http, settings, partner["partner_id"], engine)
        response = http.post(f"{settings.intake_url}/v1/cases", json=request)
        if response.status_code != 201:
            raise SystemExit(f"intake refused the sample case: {response.status_code} {response.text}")
        case_id = response.json()["case_id"]
        echo(
            f"case created: {case_id} (urgency {response.json()['urgency']}, due {response.json()['due_at']})"
        )

        records = upload_records(http, settings, case_id)
        echo(f"records uploaded: {len(records['files'])} files, records status {records['status']}")

        wait_until(
            "the cost estimate",
            lambda: case_status(http, settings, case_id)["status"] == "awaiting_patient_decision",
        )
        decision = CostDecision(choice=CostChoice.ACCEPT, by="demo-patient", reason="accepted in the demo")
        asyncio.run(workflow_call(settings, case_id, "decide_cost", decision))
        echo("patient accepted the estimated cost")

        reviewer = review_as_specialist(http, settings, case_id)
        echo(f"offer accepted and second opinion submitted by {reviewer}")

        wait_until(
            "the report to be delivered",
            lambda: case_status(http, settings, case_id)["status"] == "follow_up",
        )
        closing = CloseCase(by="demo-referrer", reason="no further questions")
        asyncio.run(workflow_call(settings, case_id, "close", closing))
        case = wait_until(
            "the case to close",
            lambda: (c := case_status(http, settings, case_id))["status"] == "closed" and c,
        )
        pdf = http.get(case["report"]["pdf_url"], headers={"Accept": "application/pdf"})
        pdf.raise_for_status()
        out = settings.data_dir / "demo" / f"report-{case_id}.pdf"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(pdf.content)
        transitions = [t["status"] for t in case["timeline"] if t.get("kind", "transition") == "transition"]
        echo(f"timeline: {' -> '.join(transitions)}")
        echo(f"report (PDF):  {case['report']['pdf_url']}  saved to {out}")
        echo(f"report (FHIR): {case['report']['fhir_url']}")
        ours = case["partner_case_ref"]
        [oru] = wait_until(
            "the report to reach the clinic's HL7 interface engine",
            lambda: [m for m in engine.received if str(m.segment("OBR")[2]).startswith(f"{ours}^")],
            timeout=60,
        )
        if oru_pdf(oru) != pdf.content:
            raise SystemExit("the ORU^R01's PDF is not the report the case API serves")
        http.delete(
            f"{settings.intake_url}/v1/partners/{partner['partner_id']}/hl7-endpoints/{endpoint_id}"
        ).raise_for_status()  # its listener goes with this run
        echo(
            f"report (HL7):  ORU^R01 {oru.segment('MSH')[10]} at the clinic's interface engine (MLLP, port "
            f"{engine.port}), result status {oru.segment('OBR')[25]}, the signed PDF in OBX ED"
        )
        echo(
            f"Temporal UI:   http://127.0.0.1:{settings.temporal_ui_port}/namespaces/"
            f"{settings.temporal_namespace}/workflows/case-{case_id}"
        )
        return str(case_id)


def start_waiting_case(settings: Settings) -> str:
    """A second case whose records have not arrived: what operations see waiting for records."""
    partner = demo_partner(settings)
    request = dict(
        SAMPLE_CASE, partner_id=partner["partner_id"], partner_case_ref=f"DEMO-{secrets.token_hex(4)}"
    )
    headers = {"Authorization": f"Bearer {partner['api_key']}"}
    response = httpx.post(f"{settings.intake_url}/v1/cases", json=request, headers=headers, timeout=30)
    response.raise_for_status()
    return str(response.json()["case_id"])


def main() -> None:
    settings = get_settings()
    stack.up(settings)
    waiting = start_waiting_case(settings)
    print(
        f"a second case waits for records: case-{waiting} (temporal workflow list --query 'CaseStatus=\"awaiting_records\"')"
    )
    case_id = run_case(settings)
    print(f"case_id={case_id}")
    sys.stdout.flush()
    os._exit(0)  # temporalio can abort the interpreter at exit (sdk-python #300)


if __name__ == "__main__":
    main()
