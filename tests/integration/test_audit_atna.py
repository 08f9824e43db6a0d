"""The audit log forwarded to a hospital's audit record repository (IHE ATNA ITI-20): a real rsyslog started by
the test, TLS with both sides' certificates (RFC 5425), on the real PostgreSQL.

What the hospital's security officer checks: a case read and another partner's refused read arrive as valid
DICOM audit messages naming who, from where, and which case; nothing of the patient goes with them and nothing
of them goes to our logs; with the repository down nothing is lost or doubled and the order holds; of two
forwarders one sends. A repository that takes only UDP (RFC 5426, rsyslog's imudp) gets the same messages, one
per datagram, in order; a refused datagram keeps the cursor; a message too large for the datagram limit has its
free text cut or, when even that does not make it fit, is skipped and named in our log; ENV=prod refuses UDP
unless AUDIT_ATNA_ALLOW_UDP says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.auth import audit, tenancy
from services.auth.atna import Source
from services.auth.atna_forward import AtnaSettings, Forwarder, RepositoryUnavailable, backlog
from services.auth.models import AuditEvent, ForwardCursor
from services.auth.partners import create_partner
from services.common.config import PROJECT_ROOT, Settings
from services.intake import api
from tests.atna.rsyslog import Received, Rsyslog
from tests.atna.schema import valid_audit_message
from tests.infra import wait_until
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import SAMPLE
from tests.pki import Authority

CLIENT = "secondopinion-atna"


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("atna-pki"), "hospital")


@pytest.fixture
def repository(tmp_path: Path, pki: Authority) -> Iterator[Rsyslog]:
    receiver = Rsyslog(tmp_path, pki, CLIENT)
    receiver.start()
    yield receiver
    receiver.stop()


def feed_settings(repository: Rsyslog, pki: Authority, **changes: object) -> AtnaSettings:
    client = pki.issue(CLIENT)
    values: dict[str, object] = {
        "url": f"tls://127.0.0.1:{repository.port}",
        "ca_file": str(pki.cert),
        "cert_file": str(client.cert),
        "key_file": str(client.key),
        "site_id": "Bayview",
        "feed": f"test-{uuid.uuid4().hex[:12]}",
        "start": "now",
        "poll_seconds": 0.05,
        "backoff_max_seconds": 0.4,
        "timeout_seconds": 3,
    }
    return AtnaSettings(**(values | changes))  # type: ignore[arg-type]


class Running:
    """Forwarders of one feed, each on its own thread as each replica's process would run one."""

    def __init__(self, auth: Engine, settings: AtnaSettings) -> None:
        self.auth, self.settings = auth, settings
        self.forwarders: list[tuple[Forwarder, threading.Thread]] = []

    def start(self) -> Forwarder:
        forwarder = Forwarder(self.auth, self.settings, Source(self.settings.app_name, self.settings.site_id))
        if not self.forwarders:
            forwarder.forward_once()  # the feed starts now: its cursor is the head
        thread = threading.Thread(target=forwarder.run, daemon=True)
        thread.start()
        self.forwarders.append((forwarder, thread))
        return forwarder

    def stop(self, forwarder: Forwarder | None = None) -> None:
        for each, thread in self.forwarders:
            if forwarder is None or each is forwarder:
                each.stop.set()
                thread.join(timeout=10)


@pytest.fixture
def feed(engines: tuple[Engine, Engine]) -> Iterator[Callable[[AtnaSettings], Running]]:
    running: list[Running] = []

    def start(settings: AtnaSettings) -> Running:
        run = Running(engines[1], settings)
        running.append(run)
        return run

    yield start
    for run in running:
        run.stop()


def arrived(repository: Rsyslog, count: int, naming: str) -> list[Received]:
    """The messages naming `naming` once `count` of them arrived (15 s at most)."""

    def mine() -> list[Received]:
        return [m for m in repository.received() if naming.encode() in m.xml]

    wait_until(lambda: len(mine()) >= count, f"{count} audit messages at the repository")
    return mine()


def partner_key(auth: Engine, name: str) -> tuple[str, str]:
    with Session(auth) as session:
        credentials = create_partner(session, name)
        session.commit()
    return credentials.partner_id, credentials.api_key


def test_a_case_read_and_another_partners_refused_read_arrive_as_dicom_audit_messages(
    engines: tuple[Engine, Engine],
    repository: Rsyslog,
    pki: Authority,
    feed: Callable[[AtnaSettings], Running],
) -> None:
    intake, auth = engines
    settings = feed_settings(repository, pki)
    with structlog.testing.capture_logs() as logged:
        feed(settings).start()
        owner, owner_key = partner_key(auth, "Bayview Clinic")
        intruder, intruder_key = partner_key(auth, "Other Clinic")
        with TestClient(intake_app((intake, auth), api.router)) as client:
            created = client.post("/v1/cases", json=SAMPLE, headers={"Authorization": f"Bearer {owner_key}"})
            case_id = created.json()["case_id"]
            assert client.get(
                f"/v1/cases/{case_id}", headers={"Authorization": f"Bearer {owner_key}"}
            ).is_success
            refused = client.get(f"/v1/cases/{case_id}", headers={"Authorization": f"Bearer {intruder_key}"})
            assert refused.status_code == 404
        messages = arrived(repository, 3, case_id)

    assert [(m.pri, m.app_name, m.msgid) for m in messages] == [(85, "secondopinion", "IHE+RFC-3881")] * 3
    documents = [valid_audit_message(m.xml) for m in messages]
    events = [d.find("EventIdentification") for d in documents]
    assert [(e.find("EventID").get("csd-code"), e.get("EventActionCode"), e.get("EventOutcomeIndicator")) for e in events] == [
        ("110109", "C", "0"),  # Order Record: the case created
        ("110109", "R", "0"),  # read by its partner
        ("110109", "R", "4"),  # refused to another partner: a minor failure, with why
    ]  # fmt: skip
    assert events[2].findtext("EventOutcomeDescription") == "another partner's case"
    requestors = [d.find("ActiveParticipant[@UserIsRequestor='true']") for d in documents]
    assert [r.get("AlternativeUserID") for r in requestors] == [owner, owner, intruder]
    assert [r.get("UserID") for r in requestors] == [
        f"key:{key.split('_')[1]}" for key in (owner_key, owner_key, intruder_key)
    ]
    assert all(
        r.get("NetworkAccessPointID") == "testclient" for r in requestors
    )  # as the service saw the caller
    for document in documents:
        assert document.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "Bayview"
        [case] = document.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
        assert case.get("ParticipantObjectID") == f"urn:uuid:{case_id}"
    # The patient is named by the facility's patient id, as ATNA asks, and by nothing else ...
    patient = SAMPLE["patient"]
    for document, message in zip(documents, messages, strict=True):
        [named] = document.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
        assert named.get("ParticipantObjectID") == patient["mrn"]
        for value in (patient["family_name"], patient["given_name"], patient["birth_date"]):
            assert value.encode() not in message.xml
    # ... and the forwarder's logs name counts and the cursor, never a case, a key or a message.
    said = json.dumps([e for e in logged if e["event"].startswith("atna.")], default=str)
    assert "atna.forwarded" in said
    assert case_id not in said and "AuditMessage" not in said and owner not in said
    assert patient["mrn"] not in said


def test_a_case_the_services_registered_carries_its_patient_id_from_then_on(
    engines: tuple[Engine, Engine], repository: Rsyslog, pki: Authority
) -> None:
    """Records, insurance and review register a case's owner from the workflow's commands, now with the
    facility's patient id: their entries' messages name the patient (a registration without one, insurance's
    for a self-pay case, neither hides nor changes it)."""
    _, auth = engines
    settings = feed_settings(repository, pki)
    forwarder = Forwarder(auth, settings)
    forwarder.forward_once()  # the feed starts at the head
    case_id = str(uuid.uuid4())
    tenancy.register_owner(auth, case_id, "clinic-a")
    tenancy.register_owner(auth, case_id, "clinic-a", "MRN-7781")
    tenancy.register_owner(auth, case_id, "clinic-b", None)
    audit.record(
        auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="records",
        action="read", resource="records", case_id=case_id, outcome="success",
    )  # fmt: skip
    assert forwarder.forward_once() == 1
    [message] = arrived(repository, 1, case_id)
    document = valid_audit_message(message.xml)
    assert document.find("EventIdentification/EventID").get("csd-code") == "110110"  # Patient Record
    [patient] = document.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == "MRN-7781"
    assert tenancy.owner_of(auth, case_id) == "clinic-a"


def test_with_the_repository_down_entries_wait_and_then_arrive_once_in_order(
    engines: tuple[Engine, Engine],
    repository: Rsyslog,
    pki: Authority,
    feed: Callable[[AtnaSettings], Running],
) -> None:
    _, auth = engines
    settings = feed_settings(repository, pki)
    feed(settings).start()
    run = uuid.uuid4().hex[:8]

    def entries(numbers: range) -> None:
        for n in numbers:
            audit.record(
                auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="records",
                action="read", resource="records", case_id=str(uuid.uuid4()), outcome="success", detail=f"{run} #{n}",
            )  # fmt: skip

    entries(range(0, 3))
    arrived(repository, 3, run)
    repository.stop()  # the repository goes down (its connection closed)
    entries(range(3, 8))
    wait_until(lambda: backlog(auth, settings)["backlog"] == 5, "the backlog to show the 5 waiting entries")
    status = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "audit", "forward-status"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "AUDIT_ATNA_FEED": settings.feed, "AUDIT_ATNA_URL": settings.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = json.loads(status.stdout)
    assert (shown["feed"], shown["backlog"], shown["enabled"]) == (settings.feed, 5, True)
    time.sleep(1)  # the forwarder retries, backing off, and sends nothing anywhere
    repository.start()
    messages = arrived(repository, 8, run)
    time.sleep(0.5)  # nothing more comes (no entry twice)
    messages = [m for m in repository.received() if run.encode() in m.xml]
    numbers = [int(valid_audit_message(m.xml).findtext("EventIdentification/EventOutcomeDescription").split("#")[1]) for m in messages]  # fmt: skip
    assert numbers == list(range(8))
    assert backlog(auth, settings)["backlog"] == 0


def test_of_two_forwarders_one_sends_and_the_other_takes_over_when_it_stops(
    engines: tuple[Engine, Engine],
    repository: Rsyslog,
    pki: Authority,
    feed: Callable[[AtnaSettings], Running],
) -> None:
    _, auth = engines
    settings = feed_settings(repository, pki)
    running = feed(settings)
    first = running.start()
    wait_until(lambda: first.active, "the first forwarder to hold the feed's lock")
    second = running.start()
    run = uuid.uuid4().hex[:8]

    def entries(numbers: range) -> None:
        for n in numbers:
            audit.record(
                auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="intake",
                action="read", resource="case", case_id=str(uuid.uuid4()), outcome="success", detail=f"{run} #{n}",
            )  # fmt: skip

    entries(range(0, 10))
    arrived(repository, 10, run)
    time.sleep(0.3)
    assert len([m for m in repository.received() if run.encode() in m.xml]) == 10
    assert [first.active, second.active] == [True, False]
    running.stop(first)
    entries(range(10, 13))
    messages = arrived(repository, 13, run)
    assert second.active and len(messages) == 13


def test_a_repository_the_configured_ca_did_not_sign_gets_nothing_and_the_cursor_stays(
    engines: tuple[Engine, Engine], repository: Rsyslog, pki: Authority, tmp_path: Path
) -> None:
    """TLS both ways: a server whose certificate our CA setting did not sign is not sent a byte (the handshake
    fails first), and the entries wait."""
    _, auth = engines
    stranger = Authority(tmp_path, "stranger")
    settings = feed_settings(repository, pki, ca_file=str(stranger.cert))
    forwarder = Forwarder(auth, settings)
    forwarder.forward_once()  # the feed starts at the head
    audit.record(
        auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="intake",
        action="read", resource="case", case_id=str(uuid.uuid4()), outcome="success",
    )  # fmt: skip
    with pytest.raises(RepositoryUnavailable, match="SSLCertVerificationError"):
        forwarder.forward_once()
    with Session(auth) as session:
        cursor = session.get(ForwardCursor, settings.feed)
    assert cursor is not None and backlog(auth, settings)["backlog"] == 1
    assert repository.received() == []


@pytest.mark.parametrize("who", ["a stranger's CA", "a name the repository does not permit"])
def test_a_client_certificate_the_repository_refuses_sends_nothing_and_the_cursor_stays(
    engines: tuple[Engine, Engine], repository: Rsyslog, pki: Authority, tmp_path: Path, who: str
) -> None:
    """With TLS 1.3 the repository judges our certificate after our side of the handshake is done: the entries
    written at once went into a connection about to be refused, and the cursor moved past them (lost)."""
    _, auth = engines
    client = (
        Authority(tmp_path, "stranger").issue(CLIENT) if who.startswith("a stranger") else pki.issue("other")
    )
    settings = feed_settings(repository, pki, cert_file=str(client.cert), key_file=str(client.key))
    forwarder = Forwarder(auth, settings)
    forwarder.forward_once()  # the feed starts at the head
    audit.record(
        auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="intake",
        action="read", resource="case", case_id=str(uuid.uuid4()), outcome="success",
    )  # fmt: skip
    with pytest.raises(RepositoryUnavailable):
        forwarder.forward_once()
    assert backlog(auth, settings)["backlog"] == 1
    time.sleep(0.3)
    assert repository.received() == []


@pytest.fixture
def udp_repository(tmp_path: Path) -> Iterator[Rsyslog]:
    receiver = Rsyslog(tmp_path, None, udp=True)
    receiver.start()
    yield receiver
    receiver.stop()


def udp_settings(repository: Rsyslog, **changes: object) -> AtnaSettings:
    values: dict[str, object] = {
        "url": f"udp://127.0.0.1:{repository.port}",
        "site_id": "Bayview",
        "feed": f"test-{uuid.uuid4().hex[:12]}",
        "start": "now",
        "poll_seconds": 0.05,
        "backoff_max_seconds": 0.4,
    }
    return AtnaSettings(**(values | changes))  # type: ignore[arg-type]


def case_read(auth: Engine, case_id: str, detail: str = "", resource: str = "case") -> None:
    audit.record(
        auth, actor="key:0123456789ab", partner_id="clinic-a", role="partner", service="records",
        action="read", resource=resource, case_id=case_id, outcome="success", detail=detail,
    )  # fmt: skip


def ids_of(auth: Engine, case_id: str) -> list[int]:
    with Session(auth) as session:
        query = select(AuditEvent.id).where(AuditEvent.case_id == case_id).order_by(col(AuditEvent.id))
        return [i for i in session.exec(query).all() if i is not None]


def test_over_udp_entries_arrive_in_order_one_message_per_datagram_as_dicom_audit_messages(
    engines: tuple[Engine, Engine], udp_repository: Rsyslog, feed: Callable[[AtnaSettings], Running]
) -> None:
    """What rsyslog's imudp logs is each datagram as one RFC 5424 message (an octet count before it, as over
    TLS, would not parse), carrying the message the TLS feed carries."""
    _, auth = engines
    settings = udp_settings(udp_repository)
    feed(settings).start()
    case_id = str(uuid.uuid4())
    for n in range(6):
        case_read(auth, case_id, detail=f"#{n}")
    messages = arrived(udp_repository, 6, case_id)
    time.sleep(0.3)  # nothing more comes
    assert len([m for m in udp_repository.received() if case_id.encode() in m.xml]) == 6
    assert [(m.pri, m.app_name, m.msgid) for m in messages] == [(85, "secondopinion", "IHE+RFC-3881")] * 6
    documents = [valid_audit_message(m.xml) for m in messages]
    assert [d.findtext("EventIdentification/EventOutcomeDescription") for d in documents] == [
        f"#{n}" for n in range(6)
    ]
    assert {d.find("EventIdentification/EventID").get("csd-code") for d in documents} == {"110109"}
    assert backlog(auth, settings)["backlog"] == 0


def test_over_udp_a_refused_datagram_keeps_the_cursor_and_is_sent_again(
    engines: tuple[Engine, Engine], udp_repository: Rsyslog
) -> None:
    """With nothing listening the repository's host answers ICMP port unreachable: the entry stays after the
    cursor and goes once the repository listens again; forward-status says delivery is at most once."""
    _, auth = engines
    settings = udp_settings(udp_repository)
    forwarder = Forwarder(auth, settings)
    forwarder.forward_once()  # the feed starts at the head
    udp_repository.stop()
    case_id = str(uuid.uuid4())
    for n in range(3):
        case_read(auth, case_id, detail=f"#{n}")
    with pytest.raises(RepositoryUnavailable, match="ConnectionRefusedError"):
        forwarder.forward_once()
    assert backlog(auth, settings)["backlog"] == 3
    status = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "audit", "forward-status"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "AUDIT_ATNA_FEED": settings.feed, "AUDIT_ATNA_URL": settings.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = json.loads(status.stdout)
    assert (shown["backlog"], shown["transport"]) == (3, "udp")
    assert shown["delivery"].startswith("at most once")
    udp_repository.start()
    assert forwarder.forward_once() == 3
    messages = arrived(udp_repository, 3, case_id)
    assert [valid_audit_message(m.xml).findtext("EventIdentification/EventOutcomeDescription") for m in messages] == [
        "#0", "#1", "#2"
    ]  # fmt: skip
    assert backlog(auth, settings)["backlog"] == 0


def test_over_udp_a_message_over_the_limit_has_its_free_text_cut_or_is_skipped_and_named_in_the_log(
    engines: tuple[Engine, Engine], udp_repository: Rsyslog
) -> None:
    """AUDIT_ATNA_UDP_MAX_OCTETS 1700: a read with the longest detail the log keeps (500 characters) arrives,
    its description cut (still a valid DICOM audit message); a study read whose identifiers alone are over the
    limit is skipped, its entry id logged, and the feed goes on."""
    _, auth = engines
    settings = udp_settings(udp_repository, udp_max_octets=1700)
    forwarder = Forwarder(auth, settings)
    forwarder.forward_once()  # the feed starts at the head
    case_id = str(uuid.uuid4())
    uid = "1.2.840.113619.2.55.3.604688119.868.1234567890.123456789012345."
    case_read(auth, case_id, detail="long " * 1000)
    case_read(auth, case_id, f"study {uid}1 series {uid}2 instance {uid}3", resource="records.dicomweb")
    case_read(auth, case_id, detail="short")
    cut, too_large, _ = ids_of(auth, case_id)
    with structlog.testing.capture_logs() as logged:
        assert forwarder.forward_once() == 3
    messages = arrived(udp_repository, 2, case_id)
    time.sleep(0.3)
    assert len([m for m in udp_repository.received() if case_id.encode() in m.xml]) == 2
    documents = [valid_audit_message(m.xml) for m in messages]
    described = [d.findtext("EventIdentification/EventOutcomeDescription") for d in documents]
    assert described[0].startswith("long long") and described[0].endswith("\u2026")
    assert len(described[0]) < len("long " * 1000)
    assert described[1] == "short"
    [skipped] = [e for e in logged if e["event"] == "atna.entry_too_large"]
    assert (skipped["entry_id"], skipped["udp_max_octets"]) == (too_large, 1700)
    assert [e["entry_id"] for e in logged if e["event"] == "atna.entry_shortened"] == [cut]
    assert uid not in json.dumps(logged, default=str)
    assert all(len(m.xml) < 1700 for m in messages)
    assert backlog(auth, settings)["backlog"] == 0


def test_in_production_udp_is_refused_unless_the_operator_allows_it(tmp_path: Path) -> None:
    env = {**os.environ, "ENV": "prod", "DATA_DIR": str(tmp_path), "AUDIT_ATNA_URL": "udp://127.0.0.1:9"}
    refused = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "audit", "forward"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "AUDIT_ATNA_ALLOW_UDP=true" in refused.stderr
    assert AtnaSettings(url="udp://127.0.0.1:9", allow_udp=True).problems("prod") == []
