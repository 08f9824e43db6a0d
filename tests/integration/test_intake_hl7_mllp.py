"""The integrated report to a hospital's interface engine as HL7 v2.5.1 ORU^R01 over MLLP: a real MLLP listener
(python-hl7's asyncio server) as the engine, the review service over HTTP serving the report, intake's consumer
writing the outbox on the real PostgreSQL, and the sender sending it."""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import DeliverReport, new_event
from scripts.demo import InterfaceEngine
from services.auth.atna import NETWORK_CONFIGURATION, kind_of
from services.auth.models import AuditEvent
from services.common.config import Settings
from services.intake import api, consumer, hl7_out, hl7_out_api
from services.intake.hl7_out import Hl7Sender, check_endpoint
from services.intake.host_lookup import EndpointRefused
from services.intake.models import Hl7Endpoint, Hl7Message
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_fhir_client_review_insurance import composed, review, review_engine
from tests.integration.test_intake_api import SAMPLE, new_partner
from tests.integration.test_review_flow import apply
from tests.integration.test_review_followup import question_command
from tests.keys import operations_headers, specialist_headers
from tests.pki import Authority

__all__ = ["review", "review_engine"]  # the review service over HTTP (its module's fixtures)


class Listener(InterfaceEngine):
    """The demo's interface engine, scripted: answers each message as its script says ("AA", "AE",
    "AR", "drop": close without an ACK, "silent": no answer, the connection left open, "foreign": an AA for
    another control id and nothing more)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.script: list[str] = []
        super().__init__(tls)

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                action = self.script.pop(0) if self.script else "AA"
                if action == "drop":
                    return
                if action == "silent":  # an engine that takes the message and never answers
                    continue
                if action == "foreign":
                    ours = str(message.segment("MSH")[10])
                    writer.writemessage(
                        str(message.create_ack("AA", message_id="ACK1")).replace(ours, "SOMEONE")
                    )
                else:
                    writer.writemessage(message.create_ack(action))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def control_ids(self) -> list[str]:
        return [str(m.segment("MSH")[10]) for m in self.received]


@pytest.fixture
def listener() -> Iterator[Listener]:
    engine = Listener()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def client(engines: tuple[Engine, Engine]) -> Iterator[TestClient]:
    with TestClient(intake_app(engines, api.router, hl7_out_api.router)) as c:
        yield c


@pytest.fixture
def sender(engines: tuple[Engine, Engine], settings: Settings) -> Hl7Sender:
    key = operations_headers(settings)["Authorization"].removeprefix("Bearer ")
    return Hl7Sender(
        engine=engines[0], env="dev", report_key=key, base_delay=0.05, timeout=3.0, rng=random.Random(7)
    )


@pytest.fixture(scope="module")
def report(review_engine: Engine, settings: Settings, review: str) -> dict[str, str]:
    """A report composed and served by the review service: the URLs the workflow's report.deliver carries."""
    report_id, case_id, _ = composed(review_engine, settings, review)
    return {
        "report_id": report_id,
        "pdf_url": f"{review}/v1/reports/{case_id}/pdf",
        "fhir_url": f"{review}/fhir/DiagnosticReport/{report_id}",
    }


def registered(
    client: TestClient,
    engines: tuple[Engine, Engine],
    listener: Listener,
    *,
    keep_others: bool = False,
    **fields: Any,
) -> tuple[dict[str, str], str, str]:
    """A partner with an MLLP endpoint at `listener` and a case: (partner, endpoint id, case id). Earlier
    tests' endpoints are disabled unless `keep_others`: their listeners are gone, and a port may be taken again."""
    with Session(engines[0]) as session:
        session.execute(
            update(Hl7Endpoint)
            .where(col(Hl7Endpoint.disabled_at).is_(None), not keep_others)
            .values(disabled_at=datetime.now(UTC))
        )
        session.commit()
    partner = new_partner(engines[1], "Bayview Hospital")
    headers = {"Authorization": partner["Authorization"]}
    body = {"host": "127.0.0.1", "port": listener.port, "tls": False, "receiving_application": "RIS",
            "receiving_facility": "BAYVIEW", "assigning_authority": "BAYVIEW_MRN"} | fields  # fmt: skip
    endpoint = client.post(f"/v1/partners/{partner['partner_id']}/hl7-endpoints", json=body, headers=headers)
    assert endpoint.status_code == 201, endpoint.text
    order = {"partner_case_ref": f"ORD-{partner['partner_id'][-8:]}"}  # the hospital's order number
    case = client.post("/v1/cases", json=SAMPLE | order, headers=headers)
    assert case.status_code == 201, case.text
    return partner, endpoint.json()["endpoint_id"], case.json()["case_id"]


def deliver(engine: Engine, case_id: str, report: dict[str, str], event_id: str) -> None:
    """The workflow's report.deliver, applied by intake's consumer (one transaction, as the consumer commits)."""
    event = new_event(
        id=event_id, source="/workflows/case", subject=case_id, data=DeliverReport(case_id=case_id, **report)
    )
    with Session(engine) as session:
        consumer.handle(session, event)
        session.commit()


def send_until(sender: Hl7Sender, done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the message did not arrive in time"
        sender.run_once()
        time.sleep(0.02)


def message_log(client: TestClient, partner: dict[str, str], endpoint_id: str) -> list[dict[str, Any]]:
    answer = client.get(
        f"/v1/partners/{partner['partner_id']}/hl7-endpoints/{endpoint_id}/messages",
        headers={"Authorization": partner["Authorization"]},
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def test_a_delivered_report_arrives_as_one_oru_r01_with_the_signed_pdf_and_an_amendment_as_a_c(
    client: TestClient,
    engines: tuple[Engine, Engine],
    settings: Settings,
    listener: Listener,
    sender: Hl7Sender,
    report: dict[str, str],
) -> None:
    partner, endpoint_id, case_id = registered(client, engines, listener)
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: len(listener.received) == 1)
    sender.run_once()
    [oru] = listener.received  # one message, acknowledged AA: not sent again

    msh, pid, obr = oru.segment("MSH"), oru.segment("PID"), oru.segment("OBR")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1"
    assert (str(msh[5]), str(msh[6])) == ("RIS", "BAYVIEW")
    patient = SAMPLE["patient"]
    assert str(pid[3]) == f"{patient['mrn']}^^^BAYVIEW_MRN^MR"
    assert str(pid[5]) == f"{patient['family_name']}^{patient['given_name']}"
    assert str(pid[7]) == patient["birth_date"].replace("-", "") and str(pid[8]) == "F"
    assert str(obr[2]) == f"ORD-{partner['partner_id'][-8:]}^SECONDOPINION"
    assert str(obr[3]) == f"{case_id}^SECONDOPINION"
    assert "ultrasound" in str(obr[4]) and str(obr[25]) == "F"
    assert str(obr[32]).split("&")[1]  # the specialist who signed it, as the report names them
    ft, ed = oru.segments("OBX")
    assert str(ft[2]) == "FT" and "Haemorrhagic cyst" in oru.unescape(str(ft[5]))
    assert str(ed[2]) == "ED" and str(ed[5]).startswith("^application^pdf^Base64^") and str(ed[11]) == "F"
    served = httpx.get(report["pdf_url"], headers=operations_headers(settings), timeout=10).content
    pdf = base64.b64decode(str(ed[5][0][4]))
    assert pdf == served and pdf.startswith(b"%PDF")
    for phi in ("Doe", "Jane", "MRN-0042"):  # nothing of the patient in the delivery log
        assert phi not in str(message_log(client, partner, endpoint_id))

    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-2")  # an answer to a question: a new version
    send_until(sender, lambda: len(listener.received) == 2)
    amended = listener.received[1]
    assert str(amended.segment("OBR")[25]) == "C"
    assert all(str(obx[11]) == "C" for obx in amended.segments("OBX"))
    first, second = listener.control_ids()
    assert first != second
    log = message_log(client, partner, endpoint_id)
    assert {(m["control_id"], m["result_status"], m["status"]) for m in log} == {
        (first, "F", "delivered"),
        (second, "C", "delivered"),
    }
    # Operations see on the case that the hospital's engine filed each version (nothing of the report's text).
    case = client.get(f"/v1/cases/{case_id}", headers={"Authorization": partner["Authorization"]}).json()
    filed = [t["detail"] for t in case["timeline"] if t["kind"] == "delivery"]
    assert filed == [
        f"the report filed by the hospital's HL7 interface engine RIS@BAYVIEW (ACK AA, ORU^R01 {first})",
        f"a new version of the report filed by the hospital's HL7 interface engine RIS@BAYVIEW (ACK AA, "
        f"ORU^R01 {second})",
    ]


@pytest.mark.parametrize("first_answer", ["AE", "drop", "AR"])
def test_an_error_or_no_ack_is_retried_with_the_same_control_id_then_delivered(
    client: TestClient,
    engines: tuple[Engine, Engine],
    listener: Listener,
    sender: Hl7Sender,
    report: dict[str, str],
    first_answer: str,
) -> None:
    partner, endpoint_id, case_id = registered(client, engines, listener)
    listener.script = [first_answer, "AA"]
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: len(listener.received) == 2)
    first, again = listener.control_ids()
    assert first == again
    [message] = message_log(client, partner, endpoint_id)
    expected = None if first_answer == "drop" else first_answer
    assert message["status"] == "delivered"
    assert [a["ack_code"] for a in message["history"]] == [expected, "AA"]
    assert message["history"][0]["error"]  # what went wrong, for the partner to check
    case = client.get(f"/v1/cases/{case_id}", headers={"Authorization": partner["Authorization"]}).json()
    alerts = [t["detail"] for t in case["timeline"] if t["kind"] == "alert" and "hl7" in t["detail"]]
    # A rejection is an alert on the case (a mapping the hospital fixes); an error or a lost ACK is retried quietly.
    assert alerts == ([f"hl7_rejected: the HL7 interface engine RIS@BAYVIEW rejected the report (AR, ORU^R01 "
                       f"{first}); it is retried: the partner checks its engine's log"]
                      if first_answer == "AR" else [])  # fmt: skip
    assert [t["kind"] for t in case["timeline"]].count("delivery") == 1


def test_a_message_no_attempt_delivers_is_an_alert_on_the_case(
    client: TestClient,
    engines: tuple[Engine, Engine],
    listener: Listener,
    sender: Hl7Sender,
    report: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partner, endpoint_id, case_id = registered(client, engines, listener)
    monkeypatch.setattr(hl7_out, "MAX_ATTEMPTS", 2)
    listener.script = ["AE", "AE"]
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: message_log(client, partner, endpoint_id)[0]["status"] == "failed")
    case = client.get(f"/v1/cases/{case_id}", headers={"Authorization": partner["Authorization"]}).json()
    [alert] = [t for t in case["timeline"] if t["kind"] == "alert" and "hl7" in t["detail"]]
    assert alert["detail"].startswith(
        "hl7_delivery_failed: the report did not reach the HL7 interface engine RIS@BAYVIEW after 2 attempts"
    )
    assert "Doe" not in alert["detail"] and "delivery" not in [t["kind"] for t in case["timeline"]]


def test_an_ack_for_another_control_id_is_not_taken_for_ours(
    client: TestClient,
    engines: tuple[Engine, Engine],
    listener: Listener,
    sender: Hl7Sender,
    report: dict[str, str],
) -> None:
    partner, endpoint_id, case_id = registered(client, engines, listener)
    listener.script = ["foreign"]
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: len(listener.received) == 1)
    time.sleep(0.2)
    [message] = message_log(client, partner, endpoint_id)
    assert message["status"] == "pending" and message["delivered_at"] is None
    assert message["history"][0]["ack_code"] is None
    assert "another control id" in message["history"][0]["error"]
    send_until(sender, lambda: len(listener.received) == 2)  # retried, and this time acknowledged
    assert listener.control_ids()[0] == listener.control_ids()[1]


def test_an_engine_that_never_answers_holds_its_own_lane_not_the_other_engines_messages(
    client: TestClient, engines: tuple[Engine, Engine], settings: Settings, report: dict[str, str]
) -> None:
    """One hospital's engine takes the message and never acknowledges it: the sender waits for its ACK until
    the timeout, and meanwhile another hospital's report goes out to its engine at once."""
    silent, healthy = Listener(), Listener()
    silent.script = ["silent"]
    key = operations_headers(settings)["Authorization"].removeprefix("Bearer ")
    sender = Hl7Sender(engine=engines[0], env="dev", report_key=key, timeout=8.0)
    running = threading.Thread(target=sender.run_forever, kwargs={"interval": 0.05}, daemon=True)
    try:
        _, _, stuck_case = registered(client, engines, silent)
        _, _, other_case = registered(client, engines, healthy, keep_others=True)
        deliver(engines[0], stuck_case, report, f"wf:{stuck_case}:deliver-1")
        deliver(engines[0], other_case, report, f"wf:{other_case}:deliver-1")
        running.start()
        deadline = time.monotonic() + 5  # well within the silent engine's 8 s

        def state(case_id: str) -> Hl7Message:
            with Session(engines[0]) as session:
                return session.exec(select(Hl7Message).where(Hl7Message.case_id == case_id)).one()

        while state(other_case).status != "delivered":
            assert time.monotonic() < deadline, (
                "the other engine's message waited for the silent engine's ACK"
            )
            time.sleep(0.05)
        stuck = state(stuck_case)  # its attempt still waits for the ACK: nothing recorded yet
        assert stuck.attempts == 0 and stuck.status == "pending"
        while not silent.received:  # the lanes run side by side: it may have been sent after the other's
            assert time.monotonic() < deadline, "the silent engine was sent nothing"
            time.sleep(0.05)
        assert len(healthy.received) == 1
        sender.stop()
        running.join(timeout=20)
        with Session(engines[0]) as session:
            other = session.exec(select(Hl7Message).where(Hl7Message.case_id == other_case)).one()
            stuck = session.exec(select(Hl7Message).where(Hl7Message.case_id == stuck_case)).one()
        assert other.status == "delivered"
        assert (stuck.status, stuck.attempts, stuck.last_ack_code) == ("pending", 1, None)
        assert "no ACK" in (stuck.last_error or "")
    finally:
        sender.stop()
        silent.close()
        healthy.close()


def test_a_sender_that_dies_after_claiming_still_delivers_through_another(
    client: TestClient,
    engines: tuple[Engine, Engine],
    settings: Settings,
    listener: Listener,
    report: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row is committed with the delivery: a sender that leased it and died before sending (or was not
    running at all) leaves it to the next, which sends it once the lease is over, under the same MSH-10."""
    partner, endpoint_id, case_id = registered(client, engines, listener)
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    monkeypatch.setattr(hl7_out, "LEASE", hl7_out.LEASE / 600)  # half a second
    key = operations_headers(settings)["Authorization"].removeprefix("Bearer ")
    dead = Hl7Sender(engine=engines[0], env="dev", report_key=key, timeout=3.0)
    [claimed] = [
        c for c in dead._claim(hl7_out.BATCH) if c.case.id == case_id
    ]  # leased, then the process died
    restarted = Hl7Sender(engine=engines[0], env="dev", report_key=key, timeout=3.0)
    restarted.run_once()
    assert listener.received == []  # leased: not sent beside the sender that holds it
    time.sleep(0.6)
    send_until(restarted, lambda: len(listener.received) == 1)
    assert listener.control_ids() == [claimed.message.id]
    with Session(engines[0]) as session:
        row = session.get(Hl7Message, claimed.message.id)
    assert row is not None and row.status == "delivered" and row.attempts == 1


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"host": "10.0.0.8"}, "private"),
        ({"host": "169.254.169.254"}, "private"),
        ({"host": "192.168.1.4"}, "private"),
        ({"host": "fe80::1"}, "private"),
        ({"host": "mllp://engine.example"}, "DNS name or an IP address"),
        ({"host": "engine.invalid"}, "does not resolve"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": "sixty"}, "port"),
        ({"receiving_facility": "BAY|VIEW"}, "receiving_facility"),
    ],
)
def test_a_registration_that_cannot_be_sent_to_is_a_clear_422(
    client: TestClient, engines: tuple[Engine, Engine], fields: dict[str, Any], says: str
) -> None:
    partner = new_partner(engines[1], "Sneaky")
    body = {"host": "127.0.0.1", "port": 6661, "tls": False, "receiving_application": "RIS",
            "receiving_facility": "BAYVIEW"} | fields  # fmt: skip
    answer = client.post(
        f"/v1/partners/{partner['partner_id']}/hl7-endpoints",
        json=body,
        headers={"Authorization": partner["Authorization"]},
    )
    assert answer.status_code == 422, answer.text
    assert says in answer.text


def test_plain_mllp_is_refused_outside_development_and_a_second_registration_is_409(
    client: TestClient, engines: tuple[Engine, Engine], listener: Listener
) -> None:
    with pytest.raises(EndpointRefused, match="tls true"):
        check_endpoint("203.0.113.10", 6661, False, "prod")
    partner, endpoint_id, _ = registered(client, engines, listener)
    again = client.post(
        f"/v1/partners/{partner['partner_id']}/hl7-endpoints",
        json={"host": "127.0.0.1", "port": listener.port, "tls": False, "receiving_application": "RIS",
              "receiving_facility": "BAYVIEW"},
        headers={"Authorization": partner["Authorization"]},
    )  # fmt: skip
    assert again.status_code == 409 and endpoint_id in again.text
    intruder = new_partner(engines[1], "Intruder")
    other = client.get(
        f"/v1/partners/{partner['partner_id']}/hl7-endpoints",
        headers={"Authorization": intruder["Authorization"]},
    )
    assert other.status_code == 404
    with Session(engines[1]) as session:  # audited as a webhook endpoint's: an ATNA Security Alert
        denied = session.exec(
            select(AuditEvent).where(AuditEvent.resource == "hl7-endpoint", AuditEvent.outcome == "denied")
        ).all()
    assert denied and kind_of(denied[-1]).type_code == NETWORK_CONFIGURATION


@pytest.mark.parametrize("trusted", [True, False])
def test_mllp_over_tls_is_checked_against_the_senders_cas_for_the_registered_host(
    client: TestClient,
    engines: tuple[Engine, Engine],
    settings: Settings,
    report: dict[str, str],
    tmp_path: Path,
    trusted: bool,
) -> None:
    """As the webhook sender: the certificate is checked for the registered host, against the sender's CAs (the
    public ones in production; the test's own CA here when `trusted`), over the address that was checked."""
    authority = Authority(tmp_path, "public")
    issued = authority.issue("engine", server=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(issued.cert, issued.key)
    engine = Listener(tls=server)
    try:
        partner, endpoint_id, case_id = registered(client, engines, engine, tls=True)
        deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
        key = operations_headers(settings)["Authorization"].removeprefix("Bearer ")
        cas = ssl.create_default_context(cafile=str(authority.cert)) if trusted else None
        sender = Hl7Sender(engine=engines[0], env="dev", report_key=key, timeout=3.0, tls=cas)
        sender.run_once()
        [message] = message_log(client, partner, endpoint_id)
        if trusted:
            assert message["status"] == "delivered" and len(engine.received) == 1
        else:
            assert message["status"] == "pending" and engine.received == []
            assert "certificate was refused" in message["history"][0]["error"]
    finally:
        engine.close()


def test_a_retry_sends_the_message_as_first_built_though_a_new_version_was_issued_meanwhile(
    client: TestClient,
    engines: tuple[Engine, Engine],
    settings: Settings,
    listener: Listener,
    sender: Hl7Sender,
    review_engine: Engine,
    review: str,
) -> None:
    """An HL7 retry is the same message: the F the engine first answered AE is sent again byte for byte, with the
    report as it was, though an answer to a question made version 2 meanwhile; version 2 comes as its own C."""
    report_id, review_case, review_id = composed(review_engine, settings, review)
    links = {"report_id": report_id, "pdf_url": f"{review}/v1/reports/{review_case}/pdf",
             "fhir_url": f"{review}/fhir/DiagnosticReport/{report_id}"}  # fmt: skip
    ops = operations_headers(settings)
    _, _, case_id = registered(client, engines, listener)
    listener.script = ["AE", "AA", "AA"]
    deliver(engines[0], case_id, links, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: len(listener.received) == 1)
    first_pdf = httpx.get(links["pdf_url"], headers=ops, timeout=10).content

    apply(review_engine, settings, question_command(review_case, "q1", "Is a repeat scan needed?"))
    answered = httpx.post(f"{review}/v1/reviews/{review_id}/questions/q1/answer", timeout=10,
                          json={"answer": "Yes, in six weeks."}, headers=specialist_headers(settings))  # fmt: skip
    assert answered.status_code == 200, answered.text
    second_pdf = httpx.get(links["pdf_url"], headers=ops, timeout=10).content
    assert second_pdf != first_pdf

    send_until(sender, lambda: len(listener.received) == 2)
    sent, again = listener.received
    assert str(again) == str(sent)  # the same message, byte for byte
    assert base64.b64decode(str(again.segments("OBX")[1][5][0][4])) == first_pdf

    deliver(engines[0], case_id, links, f"wf:{case_id}:deliver-2")  # version 2, delivered by the workflow
    send_until(sender, lambda: len(listener.received) == 3)
    amended = listener.received[2]
    assert str(amended.segment("OBR")[25]) == "C"
    assert base64.b64decode(str(amended.segments("OBX")[1][5][0][4])) == second_pdf


def test_a_delivered_messages_bytes_are_forgotten_after_30_days_and_a_later_replay_builds_it_again(
    client: TestClient,
    engines: tuple[Engine, Engine],
    listener: Listener,
    sender: Hl7Sender,
    report: dict[str, str],
) -> None:
    """The kept ORU holds the patient's identity and the report: kept while its retries and a replay need it."""
    partner, endpoint_id, case_id = registered(client, engines, listener)
    listener.script = ["AA"]
    deliver(engines[0], case_id, report, f"wf:{case_id}:deliver-1")
    send_until(sender, lambda: len(listener.received) == 1)
    with Session(engines[0]) as session:
        [message] = session.exec(select(Hl7Message).where(Hl7Message.case_id == case_id)).all()
    assert message.status == "delivered" and message.delivered_at is not None
    assert message.payload is not None and f"|{message.id}|" in message.payload  # the message as sent

    def kept() -> str | None:
        with Session(engines[0]) as session:
            row = session.get(Hl7Message, message.id)
            assert row is not None
            return row.payload

    hl7_out.forget_sent(engines[0], now=message.delivered_at + timedelta(days=29))
    assert kept() is not None
    hl7_out.forget_sent(engines[0], now=message.delivered_at + timedelta(days=31))
    assert kept() is None

    replayed = client.post(
        f"/v1/partners/{partner['partner_id']}/hl7-endpoints/{endpoint_id}/messages/{message.id}/replay",
        headers={"Authorization": partner["Authorization"]},
    )
    assert replayed.status_code == 200, replayed.text
    send_until(sender, lambda: len(listener.received) == 2)
    again = listener.received[1]
    assert str(again.segment("MSH")[10]) == message.id  # built again, under its control id
    assert str(again.segment("PID")[5]) == str(listener.received[0].segment("PID")[5])
    assert kept() is not None  # kept again from this attempt
