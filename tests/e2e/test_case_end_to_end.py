"""The whole system as separate processes: Temporal dev server (CLI), four services, the worker.

Drives the sample case from POST /v1/cases to a delivered report and checks what an operator and the
referring physician would check: the workflow Completed with its search attributes, the report PDF and
FHIR DiagnosticReport, and no PHI in any process's log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pypdf import PdfReader
from temporalio.client import WorkflowExecutionStatus

from scripts import demo, stack
from services.common.config import Settings
from services.common.temporal import (
    ASSIGNED_REVIEWER,
    CASE_DUE_AT,
    CASE_STATUS,
    CASE_URGENCY,
    PARTNER_ID,
    SUBSPECIALTY,
    connect_temporal,
)
from tests.infra import free_ports, postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data_dir: Path = tmp_path_factory.mktemp("e2e")
    with postgres_database() as database_url, rabbitmq_vhost() as amqp_url:
        ports = free_ports(
            ("intake", "records", "insurance", "review", "temporal", "ui", "codec", "payer", "scp")
        )
        env = {
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url,
            "AMQP_URL": amqp_url,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
            "TEMPORAL_UI_PORT": str(ports["ui"]),
            "CODEC_SERVER_PORT": str(ports["codec"]),
            "PAYER_SANDBOX_PORT": str(ports["payer"]),
            "RECORDS_SCP_PORT": str(ports["scp"]),
        }
        for name in ("intake", "records", "insurance", "review"):
            env[f"{name.upper()}_PORT"] = str(ports[name])
            env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{ports[name]}"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        settings = Settings()
        try:
            stack.up(settings)
            yield settings
        finally:
            stack.down(settings)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def started_input(command: list[str]) -> str:
    """The case's input as `temporal workflow show -o json` gives it, payload bytes decoded from base64."""
    history = json.loads(
        subprocess.run(
            [*command, "-o", "json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    started = history["events"][0]["workflowExecutionStartedEventAttributes"]
    return " ".join(
        base64.b64decode(p["data"]).decode(errors="replace") for p in started["input"]["payloads"]
    )


def test_sample_case_reaches_the_referring_physician(system: Settings) -> None:
    settings = system
    engine = demo.InterfaceEngine()  # the clinic's HL7 interface engine
    try:
        case_id = demo.run_case(settings, echo=lambda _: None, engine=engine)
    finally:
        engine.close()

    async def describe():  # type: ignore[no-untyped-def]
        client = await connect_temporal(settings)
        return await client.get_workflow_handle(f"case-{case_id}").describe()

    description = asyncio.run(describe())
    assert description.status == WorkflowExecutionStatus.COMPLETED
    attributes = description.typed_search_attributes
    assert attributes.get(CASE_STATUS) == "closed"
    assert attributes.get(CASE_URGENCY) == "priority"
    assert attributes.get(SUBSPECIALTY) == "gynecologic_imaging"
    assert attributes.get(PARTNER_ID) == "demo-clinic"
    assert attributes.get(ASSIGNED_REVIEWER)
    assert attributes.get(CASE_DUE_AT) is not None

    key = demo.demo_partner(settings)["api_key"]
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        case = http.get(f"{settings.intake_url}/v1/cases/{case_id}").json()
        assert [t["status"] for t in case["timeline"] if t["kind"] == "transition"] == [
            "intake",
            "awaiting_records",
            "awaiting_patient_decision",
            "matching",
            "awaiting_acceptance",
            "in_review",
            "composing_report",
            "delivering",
            "delivered",
            "follow_up",
            "closed",
        ]
        pdf = http.get(case["report"]["pdf_url"], headers={"Accept": "application/pdf"})
        assert pdf.headers["content-type"].startswith("application/pdf")
        pages = PdfReader(io.BytesIO(pdf.content)).pages
        text = " ".join(" ".join((page.extract_text() or "") for page in pages).split())
        assert "complex cystic mass" in text  # the first reader's report ...
        assert "O-RADS US 3" in text  # ... beside the second opinion
        fhir = http.get(case["report"]["fhir_url"])
        report = DiagnosticReport.model_validate(fhir.json())
        assert report.status == "final"
        assert report.presentedForm and report.presentedForm[0].contentType == "application/pdf"
        # An EHR fetching the attachment, with no Accept header, gets the PDF the hash names.
        attached = http.get(report.presentedForm[0].url)
        assert attached.headers["content-type"].startswith("application/pdf")
        # (fhir.resources reads the base64Binary hash into its bytes: the SHA-1 digest itself)
        assert hashlib.sha1(attached.content, usedforsecurity=False).digest() == report.presentedForm[0].hash
        # The clinic's interface engine got the report as one ORU^R01 (final), for its order and patient,
        # with the very PDF the case API serves: intake read it from review with its own key (INTAKE_REPORT_KEY,
        # which the local stack issues).
        [oru] = engine.received
        assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(oru.segment("MSH")[12]) == "2.5.1"
        assert str(oru.segment("PID")[3]).startswith(f"{demo.SAMPLE_CASE['patient']['mrn']}^")
        assert str(oru.segment("OBR")[2]) == f"{case['partner_case_ref']}^SECONDOPINION"
        assert (str(oru.segment("OBR")[3]), str(oru.segment("OBR")[25])) == (f"{case_id}^SECONDOPINION", "F")
        assert demo.oru_pdf(oru) == pdf.content
        # The report names the partner's order it answers, and the patient by the referring MRN.
        [order] = report.basedOn
        assert (order.type, order.identifier.value) == ("ServiceRequest", case["partner_case_ref"])
        assert (report.subject.type, report.subject.identifier.type.coding[0].code) == ("Patient", "MR")

        # The second opinion is stored with the study it reads, as a DICOM Encapsulated PDF.
        def stored_report() -> list[dict]:  # type: ignore[type-arg]
            files = http.get(f"{settings.records_url}/v1/records/{case_id}").json()["files"]
            return [f for f in files if f.get("modality") == "DOC"]

        demo.wait_until("the encapsulated report to reach records", stored_report, timeout=30)
        records = http.get(f"{settings.records_url}/v1/records/{case_id}").json()
        assert records["status"] == "assembled"
        assert sorted(f["kind"] for f in records["files"]) == ["dicom", "dicom", "dicom", "dicom", "report"]
        [encapsulated] = [f for f in records["files"] if f.get("modality") == "DOC"]
        assert {f["study_instance_uid"] for f in records["files"] if f["kind"] == "dicom"} == {
            encapsulated["study_instance_uid"]
        }
        # Downloaded from review it is that very instance, as records hands it out: one UID, one identity.
        from_review = http.get(
            f"{settings.review_url}/v1/reports/{case_id}", headers={"Accept": "application/dicom"}
        )
        from_records = http.get(f"{settings.records_url}/v1/records/{case_id}/files/{encapsulated['sha256']}")
        assert from_review.status_code == 200, from_review.text
        assert from_review.content == from_records.content

        coverage = http.get(f"{settings.insurance_url}/v1/coverage/{case_id}").json()
        assert coverage["coverage_status"] == "covered"

        for service in ("intake", "records", "insurance", "review"):
            port = getattr(settings, f"{service}_port")
            assert http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            assert "http_requests_total" in http.get(f"http://127.0.0.1:{port}/metrics").text

    phi = [demo.SAMPLE_CASE["patient"][k] for k in ("family_name", "mrn", "birth_date")]
    # The Temporal CLI shows the history encrypted; through the codec server authorized staff read it.
    show = [
        stack.temporal_cli(),
        "workflow",
        "show",
        "-w",
        f"case-{case_id}",
        "--address",
        settings.temporal_address,
    ]
    assert not [v for v in phi if v in started_input(show)]
    decoded = started_input([*show, "--codec-endpoint", f"http://127.0.0.1:{settings.codec_server_port}"])
    assert all(value in decoded for value in phi)
    for log in (settings.data_dir / "logs").glob("*.log"):
        if log.name == "temporal.log":
            continue
        content = log.read_text(errors="replace")
        leaked = [value for value in phi if value in content]
        assert not leaked, f"{log.name} contains PHI {leaked}"

    # Before a worker upgrade, operations replay the cases on the new code: here, on this code, every case passes.
    check = subprocess.run(
        [str(Path(sys.executable).parent / "secondopinion"), "case", "replay-check", "--all"],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    checked = json.loads(check.stdout)
    assert checked["failed"] == [] and checked["replayed"] >= 1


def test_unknown_case_and_bad_upload_are_clear_4xx(system: Settings) -> None:
    key = demo.demo_partner(system)["api_key"]
    assert httpx.get(f"{system.intake_url}/v1/cases", timeout=10).status_code == 401  # no key, no data
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        missing = http.get(f"{system.intake_url}/v1/cases/00000000-0000-0000-0000-000000000000")
        assert missing.status_code == 404
        bad = http.post(
            f"{system.intake_url}/v1/cases",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 422
        assert json.loads(bad.text)["title"] == "Invalid request"


def send_then_read(base_url: str, path: str, key: str, body: io.BytesIO) -> tuple[str, str]:
    """A plain HTTP/1.1 client that writes the whole request, then reads the answer (as many do)."""
    address = httpx.URL(base_url)
    data = body.getvalue()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/zip\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port or 80), timeout=60) as connection:
        connection.sendall(head.encode() + data)
        answer = connection.makefile("rb").read().decode(errors="replace")
    return answer.split("\r\n", 1)[0], answer.split("\r\n\r\n", 1)[-1]


def test_a_cd_as_a_zip_body_streams_in_and_a_hostile_one_gets_its_answer(system: Settings) -> None:
    """Through the real records process (uvicorn): a CD sent as one ZIP body in 64 KiB chunked pieces; and a
    ZIP refused at its first member while 40 MB more are still coming, from a client that sends its whole
    body before it reads: it reads the 422, not a reset connection, and nothing of it is kept."""
    case_id = demo.start_waiting_case(system)
    key = demo.demo_partner(system)["api_key"]
    study = demo.synthetic_study(demo.SAMPLE_CASE["patient"])
    cd = io.BytesIO()
    with zipfile.ZipFile(cd, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in study:
            zf.writestr(f"DICOM/{name}", data)
    hostile = io.BytesIO()
    with zipfile.ZipFile(hostile, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("../../outside.dcm", study[0][1])
        zf.writestr("DICOM/PADDING", os.urandom(40 * 1024 * 1024))

    def pieces(data: bytes) -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    url = f"{system.records_url}/v1/records/{case_id}/archive"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/zip"}
    with httpx.Client(timeout=60, headers=headers) as http:
        demo.wait_until(
            "the records request",
            lambda: http.get(f"{system.records_url}/v1/records/{case_id}").status_code == 200,
        )
        status_line, detail = send_then_read(
            system.records_url, f"/v1/records/{case_id}/archive", key, hostile
        )
        assert status_line.startswith("HTTP/1.1 422") and "leaves the archive root" in detail
        assert http.get(f"{system.records_url}/v1/records/{case_id}").json()["files"] == []

        stored = http.post(url, content=pieces(cd.getvalue()))
        assert stored.status_code == 201, stored.text
        body = stored.json()
        assert (body["new_files"], body["import_status"]) == (3, "released")
        listed = http.get(f"{system.records_url}/v1/records/{case_id}").json()["files"]
        assert sorted(f["sha256"] for f in listed) == sorted(f["sha256"] for f in body["files"])


def test_an_idle_client_connection_outlives_the_clients_own_keep_alive(system: Settings) -> None:
    """httpx and Node keep an idle connection 5 s; a server closing at the same 5 s races them, and the
    client's next POST fails with a read error. The services keep it longer, so it is reused."""
    address = httpx.URL(system.intake_url)
    connection = http.client.HTTPConnection(address.host, address.port or 80, timeout=10)
    try:
        for _ in range(2):  # the second request goes on the same connection, or fails (RemoteDisconnected)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200 and b'"ok"' in response.read()
            time.sleep(6)  # idle beyond the clients' 5 s
    finally:
        connection.close()
