"""PHI leak canary: a patient with a unique name and MRN runs end to end on the whole stack (processes as in
test_case_end_to_end), and the canary appears in no log line of any process, no error body, no RabbitMQ
message outside the commands of the services that need the patient, and no Temporal history in clear text.

RabbitMQ traffic is captured by a queue of our own bound to both exchanges with `#`.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pika
import pytest

from scripts import demo, stack
from services.common.amqp import COMMANDS, EVENTS
from services.common.config import Settings
from tests.e2e.test_case_end_to_end import system  # noqa: F401  (the whole stack, started once here)

pytestmark = pytest.mark.e2e

CANARY_FAMILY = f"Canaryfam{secrets.token_hex(4)}"
CANARY_GIVEN = f"Canarygiv{secrets.token_hex(4)}"
CANARY_MRN = f"CANMRN{secrets.token_hex(4).upper()}"
CANARIES = (CANARY_FAMILY, CANARY_GIVEN, CANARY_MRN)
# The commands that carry the patient to a service that needs it: records reconciles the images' identity,
# insurance asks the payer about the subscriber by name and birth date (X12 270), review shows the specialist
# the patient's age and sex and prints the report's header. Nothing else may carry the canary.
NEEDS_PATIENT = {"records.collect", "insurance.verify", "review.match"}


def leaked(text: str) -> list[str]:
    return [c for c in CANARIES if c in text]


@pytest.fixture(scope="module")
def bus(system: Settings) -> Iterator[tuple[pika.adapters.blocking_connection.BlockingChannel, str]]:  # noqa: F811
    connection = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    for exchange in (COMMANDS, EVENTS):
        channel.queue_bind(queue, exchange, routing_key="#")
    try:
        yield channel, queue
    finally:
        connection.close()


def captured(channel: Any, queue: str) -> list[tuple[str, bytes]]:
    messages: list[tuple[str, bytes]] = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((method.routing_key, body))


def decoded_history(settings: Settings, workflow_id: str) -> tuple[str, str]:
    """The workflow's whole history as the Temporal CLI prints it, and every payload base64-decoded."""
    raw = subprocess.run(
        [stack.temporal_cli(), "workflow", "show", "-w", workflow_id, "--address", settings.temporal_address]
        + ["-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    payloads: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    payloads.append(base64.b64decode(value + "==").decode(errors="replace"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(raw))
    return raw, " ".join(payloads)


def test_the_canary_patient_leaks_nowhere(
    system: Settings,  # noqa: F811
    bus: tuple[Any, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = system
    patient = dict(
        demo.SAMPLE_CASE["patient"], family_name=CANARY_FAMILY, given_name=CANARY_GIVEN, mrn=CANARY_MRN
    )
    monkeypatch.setitem(demo.SAMPLE_CASE, "patient", patient)
    monkeypatch.setitem(demo.SAMPLE_CASE, "partner_case_ref", f"CANARY-{secrets.token_hex(4)}")

    case_id = demo.run_case(settings, echo=lambda _: None)

    # Error bodies: bad requests that carry the canary never echo it.
    key = demo.demo_partner(settings)["api_key"]
    errors = []
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        bad_case = dict(demo.SAMPLE_CASE, patient=dict(patient, birth_date=CANARY_MRN, state=CANARY_FAMILY))
        errors.append(http.post(f"{settings.intake_url}/v1/cases", json=bad_case))
        errors.append(
            http.post(f"{settings.intake_url}/v1/cases", json={**bad_case, "nickname": CANARY_GIVEN})
        )
        errors.append(http.get(f"{settings.records_url}/v1/records/{CANARY_MRN}"))
        errors.append(http.get(f"{settings.insurance_url}/v1/coverage/{CANARY_FAMILY}"))
        errors.append(http.get(f"{settings.review_url}/v1/reports/{CANARY_GIVEN}"))
        errors.append(
            http.post(
                f"{settings.records_url}/v1/records/{case_id}/files",
                files=[("files", (f"{CANARY_FAMILY}.dcm", CANARY_MRN.encode(), "application/dicom"))],
            )
        )
        errors.append(
            http.post(
                f"{settings.insurance_url}/v1/coverage/{case_id}/authorization",
                json={"authorization_number": CANARY_MRN, "by": CANARY_FAMILY, "nickname": CANARY_GIVEN},
            )
        )
    for response in errors:
        assert response.status_code >= 400, response.request.url
        assert response.status_code < 500, f"{response.request.url}: {response.status_code}"
        assert not leaked(response.text), f"{response.request.url} echoed {leaked(response.text)}"

    messages = captured(*bus)
    assert {key for key, _ in messages} >= {"records.collect", "review.match", "report.ready"}
    outside = {
        key: leaked(body.decode(errors="replace")) for key, body in messages if key not in NEEDS_PATIENT
    }
    assert not {key: found for key, found in outside.items() if found}, "the canary rode on the bus"

    raw, payloads = decoded_history(settings, f"case-{case_id}")
    assert not leaked(raw) and not leaked(payloads), "the workflow history shows the canary in clear text"

    logs = sorted((settings.data_dir / "logs").glob("*.log"))
    assert {log.stem for log in logs} >= {"intake", "records", "insurance", "review"}
    for log in logs:
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            assert not leaked(line), f"{log.name}:{number} carries the canary"


def test_a_404_does_not_echo_the_id_sent(system: Settings) -> None:  # noqa: F811
    key = demo.demo_partner(system)["api_key"]
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        response = http.get(f"{system.intake_url}/v1/cases/{CANARY_MRN}")
    assert response.status_code == 404
    assert not leaked(response.text)
