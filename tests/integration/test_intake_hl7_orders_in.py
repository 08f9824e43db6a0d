"""HL7 v2 orders in: a hospital's interface engine (python-hl7's MLLP client) sends ORM^O01 / OMG^O19 to intake's
real MLLP listener, over real TLS with client certificates (tests/pki), on the real PostgreSQL; the case API then
shows the case. Senders are registered through the partner API."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hl7
import hl7.mllp
import httpx
import pytest
from fastapi import HTTPException
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from temporalio.client import Client
from temporalio.worker import Worker

from services.auth.atna import NODE_AUTHENTICATION, SECURITY_ALERT, Kind, kind_of
from services.auth.models import AuditEvent
from services.common.config import Settings
from services.intake import api, fhir_api, hl7_in, hl7_senders_api, idempotency
from services.intake.models import Case, CaseCreate, Hl7Sender, Hl7SenderCreate, IdempotencyRecord
from tests.conftest import STAND_IN_QUEUE
from tests.integration.intake_app import intake_app, intake_engines
from tests.integration.test_intake_api import new_partner
from tests.integration.test_intake_decisions import StandInCaseWorkflow
from tests.pki import Authority, Issued


@dataclass
class Pki:
    authority: Authority
    server: Issued
    mirth: Issued  # partner A's engine's client certificate
    rhapsody: Issued  # partner B's
    stranger: Issued  # issued by the same CA, registered by nobody


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder: Path = tmp_path_factory.mktemp("mllp-pki")
    authority = Authority(folder, "hospitals")
    return Pki(
        authority,
        authority.issue("intake", server=True),
        authority.issue("mirth"),
        authority.issue("rhapsody"),
        authority.issue("stranger"),
    )


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[Engine, Engine]:
    return intake_engines(settings)


async def no_temporal() -> Client | None:
    return None


@dataclass
class Stack:
    http: httpx.AsyncClient
    partners: dict[str, dict[str, str]]
    listener: hl7_in.OrderListener
    pki: Pki
    engines: tuple[Engine, Engine]

    async def register(self, partner: str, body: dict[str, object]) -> httpx.Response:
        who = self.partners[partner]
        return await self.http.post(
            f"/v1/partners/{who['partner_id']}/hl7-senders",
            json=body,
            headers={"Authorization": who["Authorization"]},
        )

    async def send(self, message: str, cert: Issued | None = None) -> hl7.Message:
        """One message over MLLP (TLS with `cert` when the listener speaks TLS); the ACK, parsed."""
        tls = None
        if self.listener.tls is not None:
            tls = ssl.create_default_context(cafile=str(self.pki.authority.cert))
            if cert is not None:
                tls.load_cert_chain(str(cert.cert), str(cert.key))
        reader, writer = await hl7.mllp.open_hl7_connection(
            "127.0.0.1", self.listener.port, ssl=tls, encoding="utf-8"
        )
        try:
            writer.writemessage(message)
            await writer.drain()
            return await asyncio.wait_for(reader.readmessage(), 30)
        finally:
            writer.close()

    async def mirth(self) -> tuple[str, str]:
        """Partner A's engine registered with its certificate, under an MSH-3 of its own: (MSH-3, sender id)."""
        app = unique("MIRTH")
        body = {"sending_application": app, "sending_facility": "BAYVIEW",
                "certificate_sha256": fingerprint(self.pki.mirth)}  # fmt: skip
        registered = await self.register("A", body)
        assert registered.status_code == 201, registered.text
        return app, str(registered.json()["sender_id"])

    def cases(self, partner: str) -> list[Case]:
        with Session(self.engines[0]) as session:
            return list(
                session.exec(
                    select(Case).where(Case.partner_id == self.partners[partner]["partner_id"])
                ).all()
            )


async def stack_of(
    engines: tuple[Engine, Engine],
    settings: Settings,
    pki: Pki,
    *,
    tls: bool = True,
    temporal: Client | None = None,
    temporal_of: Callable[[], Awaitable[Client | None]] | None = None,
) -> tuple[httpx.AsyncClient, hl7_in.OrderListener, dict[str, dict[str, str]]]:
    """The case API and the order listener; the listener reaches Temporal through `temporal_of` if given (a test
    that takes Temporal away), else `temporal`."""
    app = intake_app(engines, api.router, fhir_api.router, hl7_senders_api.router, temporal=temporal)
    app.dependency_overrides[api.settings_dep] = lambda: settings
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.authority.cert))
        context.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        context.verify_mode = ssl.CERT_REQUIRED

    async def the_client() -> Client | None:
        return temporal

    listener = hl7_in.OrderListener(
        engines[0], engines[1], settings, temporal_of or the_client, host="127.0.0.1", port=0, tls=context
    )
    await listener.start()
    partners = {"A": new_partner(engines[1], "Bayview"), "B": new_partner(engines[1], "Harbor")}
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake", timeout=30)
    return http, listener, partners


@pytest.fixture
async def stack(engines: tuple[Engine, Engine], settings: Settings, pki: Pki) -> AsyncIterator[Stack]:
    http, listener, partners = await stack_of(engines, settings, pki)
    try:
        yield Stack(http, partners, listener, pki, engines)
    finally:
        await listener.stop()
        await http.aclose()


def sender_of(stack: Stack, app: str) -> str:
    """The id of the enabled sender registered under MSH-3 `app`."""
    with Session(stack.engines[0]) as session:
        sender = session.exec(select(Hl7Sender).where(Hl7Sender.sending_application == app)).one()
    return sender.id


def fingerprint(issued: Issued) -> str:
    import hashlib

    der = ssl.PEM_cert_to_DER_cert(issued.cert.read_text())
    return hashlib.sha256(der).hexdigest()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


def orm(
    *,
    app: str,
    facility: str,
    control_id: str,
    placer: str,
    control: str = "NW",
    family: str = "Doe",
    given: str = "Jane",
    birth: str = "19840302",
    npi: str = "1234567893",
    service: str = "76856^US pelvis complete^C4",
) -> str:
    """An ORM^O01 (v2.3) as Mirth sends one: ORC-12 the ordering provider, OBR-31 the reason, an NTE, an IN1."""
    return "\r".join(
        [
            f"MSH|^~\\&|{app}|{facility}|SECONDOPINION|SECONDOPINION|20261201120000||ORM^O01|{control_id}|P|2.3",
            f"PID|1||X1^^^H^PI~MRN-0042^^^BAY^MR||{family}^{given}||{birth}|F|||1 Main St^^San Francisco^CA^94110",
            "IN1|1|ACME-PPO||ACME" + "|" * 32 + "W123456789",
            f"ORC|{control}|{placer}^BAY^2.16.840.1.113883.19.5.1^ISO||||||||||{npi}^Kim^Alex^^^Dr.^^^NPI"
            + "|" * 9
            + "Bayview Women's Clinic",
            f"OBR|1|{placer}^BAY^2.16.840.1.113883.19.5.1^ISO||{service}|||20261120"
            + "|" * 24
            + "possible_malignancy^Complex adnexal mass",
            "NTE|1||benign or suspicious?",
        ]
    )


def omg(*, app: str, facility: str, control_id: str, placer: str) -> str:
    """An OMG^O19 (v2.5.1) as Rhapsody sends one: the provider in OBR-16 (XCN.13 NPI), TQ1, no IN1, a local
    OBR-4 code the sender's exam_codes map, no reason code (the sender's default_reason), the gestational age
    in an OBX."""
    return "\r".join(
        [
            f"MSH|^~\\&|{app}|{facility}|SECONDOPINION|SECONDOPINION|20261201120000||OMG^O19^OMG_O19|{control_id}"
            "|P|2.5.1||||||UNICODE UTF-8",
            "PID|1||H-77^^^HARBOR^MR||Nguyen^Linh||19900611|F|||2 Bay Rd^^Oakland^CA^94601",
            f"ORC|NW|{placer}^HARBOR",
            "TQ1|1||||||||S",
            f"OBR|1|{placer}^HARBOR||US-OB-2^Fetal survey^L|||20261125" + "|" * 9
            + "1234567893^Okafor^Ngozi^^^^^^^^^^NPI" + "|" * 15 + "^Echogenic focus on the first scan",
            "OBX|1|NM|49051-6^Gestational age^LN||22|wk",
        ]
    )  # fmt: skip


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    segment = ack.segment("MSA")
    return str(segment[1]), str(segment[2]), str(segment[3])


def errs(ack: hl7.Message) -> list[tuple[str, str]]:
    """(ERR-2, ERR-3.1) of each ERR."""
    try:
        return [(str(e[2]), str(e[3][0][0])) for e in ack.segments("ERR")]
    except KeyError:
        return []


async def test_an_orm_o01_creates_a_case_the_case_api_shows_and_a_resend_gets_the_same_ack(
    stack: Stack,
) -> None:
    app = unique("MIRTH")
    registered = await stack.register(
        "A",
        {"sending_application": app, "sending_facility": "BAYVIEW",
         "certificate_pem": stack.pki.mirth.cert.read_text()},
    )  # fmt: skip
    assert registered.status_code == 201, registered.text
    assert registered.json()["certificate_sha256"] == fingerprint(stack.pki.mirth)
    placer, control_id = unique("ORD"), unique("C")
    message = orm(app=app, facility="BAYVIEW", control_id=control_id, placer=placer)

    ack = await stack.send(message, stack.pki.mirth)

    code, acknowledged, text = msa(ack)
    assert (code, acknowledged) == ("AA", control_id), str(ack)
    [case] = stack.cases("A")
    assert case.id in text
    headers = {"Authorization": stack.partners["A"]["Authorization"]}
    shown = (await stack.http.get(f"/v1/cases/{case.id}", headers=headers)).json()
    assert shown["partner_case_ref"] == placer
    assert shown["partner_case_ref_system"] == "urn:oid:2.16.840.1.113883.19.5.1"
    assert shown["subspecialty"] == "gynecologic_imaging"
    order = (await stack.http.get(f"/fhir/ServiceRequest/{case.id}", headers=headers)).json()
    assert order["requester"]["display"] == "Dr. Alex Kim"
    assert order["requester"]["identifier"]["value"] == "1234567893"
    assert order["reasonCode"][0]["coding"][0]["code"] == "possible_malignancy"
    request = CaseCreate.model_validate_json(case.request_json)
    assert request.patient.model_dump(mode="json") == {
        "family_name": "Doe", "given_name": "Jane", "birth_date": "1984-03-02", "sex": "female",
        "mrn": "MRN-0042", "state": "CA",
    }  # fmt: skip
    assert request.exam.exam_type == "pelvic" and str(request.exam.performed_on) == "2026-11-20"
    assert request.referring.organization == "Bayview Women's Clinic"
    assert request.clinical_question == "Complex adnexal mass benign or suspicious?"
    assert (request.coverage.plan_code, request.coverage.member_id) == ("ACME-PPO", "W123456789")

    again = await stack.send(message, stack.pki.mirth)  # the ACK was lost: the engine resends
    assert str(again) == str(ack)
    assert len(stack.cases("A")) == 1

    other = await stack.send(
        orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer=placer), stack.pki.mirth
    )
    assert msa(other)[0] == "AA" and case.id in msa(other)[2] and "already" in msa(other)[2]
    assert len(stack.cases("A")) == 1

    # A week on, the kept ACKs are forgotten (hourly purge); a resend then still creates nothing: the placer
    # number finds the case.
    owner = f"hl7-sender:{sender_of(stack, app)}"
    with Session(stack.engines[0]) as session:
        assert session.get(IdempotencyRecord, (owner, control_id)) is not None  # the ACK kept for resends
    assert (
        idempotency.purge(stack.engines[0], datetime.now(UTC) + idempotency.KEEP_FOR + timedelta(hours=1))
        >= 2
    )
    with Session(stack.engines[0]) as session:
        assert session.get(IdempotencyRecord, (owner, control_id)) is None
    late = await stack.send(message, stack.pki.mirth)
    assert msa(late)[0] == "AA" and case.id in msa(late)[2] and len(stack.cases("A")) == 1


async def test_an_omg_o19_maps_through_the_senders_code_map_and_default_reason(stack: Stack) -> None:
    registered = await stack.register(
        "B",
        {"sending_application": (app := unique("RHAPSODY")), "sending_facility": "HARBOR",
         "certificate_sha256": fingerprint(stack.pki.rhapsody).upper(),
         "default_reason": "fetal_anomaly", "exam_codes": {"US-OB-2": "obstetric"}},
    )  # fmt: skip
    assert registered.status_code == 201, registered.text
    placer, control_id = unique("H"), unique("C")

    ack = await stack.send(
        omg(app=app, facility="HARBOR", control_id=control_id, placer=placer), stack.pki.rhapsody
    )

    assert msa(ack)[:2] == ("AA", control_id), str(ack)
    assert str(ack.segment("MSH")[9]) == "ACK^O19^ACK"
    [case] = stack.cases("B")
    request = CaseCreate.model_validate_json(case.request_json)
    assert (request.patient.family_name, request.patient.mrn, request.patient.birth_date.isoformat()) == (
        "Nguyen", "H-77", "1990-06-11",
    )  # fmt: skip
    assert request.exam.exam_type == "obstetric" and request.reason == "fetal_anomaly"
    assert request.gestational_age_weeks == 22
    assert request.referring.name == "Ngozi Okafor" and request.referring.npi == "1234567893"
    assert request.referring.organization == "HARBOR"  # no ORC-21: MSH-4
    assert request.clinical_question == "Echogenic focus on the first scan"
    assert request.coverage.self_pay is True
    assert (case.partner_case_ref, case.partner_case_ref_system) == (placer, "")
    assert case.subspecialty == "maternal_fetal_medicine"


def denied(auth: Engine) -> int:
    with Session(auth) as session:
        return session.exec(
            select(func.count()).where(
                col(AuditEvent.resource) == "hl7-order", col(AuditEvent.outcome) == "denied"
            )
        ).one()


async def test_an_unknown_sender_a_wrong_certificate_and_another_partners_msh4_are_refused_and_audited(
    stack: Stack,
) -> None:
    mirth, rhapsody = unique("MIRTH"), unique("RHAPSODY")
    for partner, app, facility, cert in (("A", mirth, "BAYVIEW", stack.pki.mirth),
                                          ("B", rhapsody, "HARBOR", stack.pki.rhapsody)):  # fmt: skip
        body = {
            "sending_application": app,
            "sending_facility": facility,
            "certificate_sha256": fingerprint(cert),
        }
        assert (await stack.register(partner, body)).status_code == 201
    attempts = [
        (mirth, "UNKNOWN-HOSPITAL", stack.pki.mirth),  # an MSH-4 nobody registered
        (mirth, "BAYVIEW", stack.pki.stranger),  # A's MSH-3/MSH-4, a certificate nobody registered
        (mirth, "HARBOR", stack.pki.mirth),  # A's certificate, B's facility
        (rhapsody, "HARBOR", stack.pki.mirth),  # B's MSH-3/MSH-4 entirely, A's certificate
    ]
    before = denied(stack.engines[1])
    for app, facility, cert in attempts:
        control_id = unique("C")
        ack = await stack.send(
            orm(app=app, facility=facility, control_id=control_id, placer=unique("O")), cert
        )
        code, acknowledged, _ = msa(ack)
        assert (code, acknowledged) == ("AR", control_id), str(ack)
        [(location, condition)] = errs(ack)
        assert (location, condition) == ("MSH^1^3", "207")
        assert "hl7-senders" in str(ack.segment("ERR")[8])
    assert stack.cases("A") == [] and stack.cases("B") == []
    assert denied(stack.engines[1]) == before + len(attempts)
    with Session(stack.engines[1]) as session:
        entry = session.exec(
            select(AuditEvent)
            .where(col(AuditEvent.resource) == "hl7-order")
            .order_by(col(AuditEvent.id).desc())
        ).first()
    assert entry is not None and entry.partner_id == stack.partners["A"]["partner_id"]  # whose certificate
    assert entry.network_address == "127.0.0.1" and "Doe" not in entry.detail
    assert kind_of(entry) == Kind(SECURITY_ALERT, "E", NODE_AUTHENTICATION)  # as a bad webhook signature


async def test_no_client_certificate_gets_no_connection(stack: Stack) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await stack.send(orm(app="MIRTH", facility="BAYVIEW", control_id="C1", placer="O1"), None)


@pytest.mark.parametrize(
    ("change", "location", "condition"),
    [
        (dict(birth=""), "PID^1^7", "101"),
        (dict(birth="1984-03-02"), "PID^1^7", "102"),
        (dict(npi="12345"), "ORC^1^12^1", "102"),
        (dict(service="99999^Knee MRI^L"), "OBR^1^4", "103"),
        (dict(control="XO"), "ORC^1^1", "103"),
    ],
    ids=[
        "missing-birth-date",
        "birth-date-not-a-date",
        "bad-npi",
        "unknown-exam-type",
        "other-order-control",
    ],
)
async def test_an_invalid_order_is_answered_ae_naming_the_field_and_creates_nothing(
    stack: Stack, change: dict[str, str], location: str, condition: str
) -> None:
    app, _ = await stack.mirth()
    control_id = unique("C")
    message = orm(app=app, facility="BAYVIEW", control_id=control_id, placer=unique("O"), **change)

    ack = await stack.send(message, stack.pki.mirth)

    code, acknowledged, _ = msa(ack)
    assert code == ("AR" if location == "ORC^1^1" else "AE") and acknowledged == control_id, str(ack)
    assert (location, condition) in errs(ack)
    assert str(ack.segment("ERR")[8])  # ERR-8 says what to fix
    assert stack.cases("A") == []


async def test_escaped_delimiters_and_utf8_names_map_back(stack: Stack) -> None:
    app, _ = await stack.mirth()
    family = "O\\F\\Brien\\S\\Zoë\\T\\Łukasz\\R\\Ünal\\E\\"  # | ^ & ~ \ escaped, and UTF-8 letters
    given = "Zoë Renée"
    message = orm(
        app=app, facility="BAYVIEW", control_id=unique("C"), placer=unique("O"), family=family, given=given
    )

    ack = await stack.send(message, stack.pki.mirth)

    assert msa(ack)[0] == "AA", str(ack)
    [case] = stack.cases("A")
    patient = CaseCreate.model_validate_json(case.request_json).patient
    assert patient.family_name == "O|Brien^Zoë&Łukasz~Ünal\\"
    assert patient.given_name == "Zoë Renée"


async def ordered(stack: Stack) -> tuple[str, str, str, Case]:
    """Partner A's engine registered and its order taken (AA): (MSH-3, sender id, placer order number, the case)."""
    app, sender_id = await stack.mirth()
    placer = unique("O")
    new = orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer=placer)
    assert msa(await stack.send(new, stack.pki.mirth))[0] == "AA"
    [case] = stack.cases("A")
    return app, sender_id, placer, case


async def test_cancel_by_order_control_ca_cancels_the_case_through_the_workflow(
    temporal_env,
    engines: tuple[Engine, Engine],
    settings: Settings,
    pki: Pki,  # type: ignore[no-untyped-def]
) -> None:
    queue = f"{STAND_IN_QUEUE}{uuid.uuid4().hex[:8]}"
    queued = settings.model_copy(update={"temporal_task_queue": queue})
    http, listener, partners = await stack_of(engines, queued, pki, temporal=temporal_env.client)
    stack = Stack(http, partners, listener, pki, engines)
    try:
        async with Worker(temporal_env.client, task_queue=queue, workflows=[StandInCaseWorkflow]):
            app, sender_id, placer, case = await ordered(stack)

            cancel = orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer=placer, control="CA")
            ack = await stack.send(cancel, pki.mirth)

            assert msa(ack)[0] == "AA" and case.id in msa(ack)[2], str(ack)
            handle = temporal_env.client.get_workflow_handle(f"case-{case.id}")
            received = await handle.query("received", result_type=dict)
            assert received["cancelled_by"] == f"key:hl7-sender:{sender_id}"
            shown = await stack.http.get(
                f"/v1/cases/{case.id}", headers={"Authorization": partners["A"]["Authorization"]}
            )
            assert shown.status_code == 200

            unknown = orm(
                app=app, facility="BAYVIEW", control_id=unique("C"), placer=unique("O"), control="CA"
            )
            assert errs(await stack.send(unknown, pki.mirth)) == [("ORC^1^2", "207")]
    finally:
        await listener.stop()
        await http.aclose()


async def test_a_cancel_while_temporal_is_unreachable_is_answered_ae_and_its_resend_cancels(
    temporal_env,
    engines: tuple[Engine, Engine],
    settings: Settings,
    pki: Pki,  # type: ignore[no-untyped-def]
) -> None:
    """Nothing is lost and nothing half done: the AE says to resend, the case is not cancelled, and the same
    message (same MSH-10) sent again once Temporal answers is taken, not answered from a stored AE."""
    queue = f"{STAND_IN_QUEUE}{uuid.uuid4().hex[:8]}"
    queued = settings.model_copy(update={"temporal_task_queue": queue})
    reachable: list[Client | None] = [temporal_env.client]

    async def temporal_of() -> Client | None:
        return reachable[0]

    http, listener, partners = await stack_of(engines, queued, pki, temporal_of=temporal_of)
    stack = Stack(http, partners, listener, pki, engines)
    try:
        async with Worker(temporal_env.client, task_queue=queue, workflows=[StandInCaseWorkflow]):
            app, _, placer, case = await ordered(stack)
            handle = temporal_env.client.get_workflow_handle(f"case-{case.id}")

            reachable[0] = None  # Temporal down
            cancel = orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer=placer, control="CA")
            refused = await stack.send(cancel, pki.mirth)
            assert msa(refused)[0] == "AE" and msa(refused)[2] == "resend later"
            [(_, code)] = errs(refused)
            assert code == "207" and "send the message again in a minute" in str(refused.segment("ERR"))
            assert (await handle.query("received", result_type=dict)).get("cancelled_by") is None

            reachable[0] = temporal_env.client  # back: the same message again
            taken = await stack.send(cancel, pki.mirth)
            assert msa(taken)[0] == "AA" and f"case {case.id} cancelled" in msa(taken)[2], str(taken)
            assert (await handle.query("received", result_type=dict))["cancelled_by"].startswith(
                "key:hl7-sender:"
            )
    finally:
        await listener.stop()
        await http.aclose()


async def test_plain_mllp_in_development_from_loopback_matches_msh3_msh4(
    engines: tuple[Engine, Engine], settings: Settings, pki: Pki
) -> None:
    http, listener, partners = await stack_of(engines, settings, pki, tls=False)
    stack = Stack(http, partners, listener, pki, engines)
    try:
        app = unique("DEVAPP")
        body = {"sending_application": app, "sending_facility": "LAPTOP"}  # no certificate: development only
        assert (await stack.register("A", body)).status_code == 201
        ack = await stack.send(orm(app=app, facility="LAPTOP", control_id=unique("C"), placer=unique("O")))
        assert msa(ack)[0] == "AA", str(ack)
        assert len(stack.cases("A")) == 1
    finally:
        await listener.stop()
        await http.aclose()


async def test_idle_and_surplus_connections_are_closed_so_sockets_cannot_pile_up(
    engines: tuple[Engine, Engine], settings: Settings, pki: Pki
) -> None:
    """The port faces the internet: a connection that sends nothing is closed after the idle time, one past the
    cap at once, and one that never finishes its TLS handshake after the handshake time; the others still work."""
    listener = hl7_in.OrderListener(
        engines[0], engines[1], settings, no_temporal, host="127.0.0.1", port=0, tls=None,
        idle_seconds=1.0, max_connections=2,
    )  # fmt: skip
    await listener.start()
    opened: list[asyncio.StreamWriter] = []
    try:

        async def connect() -> asyncio.StreamReader:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            opened.append(writer)
            return reader

        first, second = await connect(), await connect()
        await asyncio.sleep(0.2)  # both served
        third = await connect()
        assert await asyncio.wait_for(third.read(), 2) == b""  # past the cap: closed at once
        assert not first.at_eof() and not second.at_eof()
        assert await asyncio.wait_for(first.read(), 5) == b""  # idle for a second: closed
        assert await asyncio.wait_for(second.read(), 5) == b""
    finally:
        for writer in opened:
            writer.close()
        await listener.stop()

    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.authority.cert))
    server.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server.verify_mode = ssl.CERT_REQUIRED
    tls = hl7_in.OrderListener(
        engines[0], engines[1], settings, no_temporal, host="127.0.0.1", port=0, tls=server,
        handshake_seconds=1.0,
    )  # fmt: skip
    await tls.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tls.port)  # TCP only, no handshake
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await tls.stop()


def test_outside_development_the_listener_refuses_to_start_without_tls(
    engines: tuple[Engine, Engine], settings: Settings
) -> None:
    prod = settings.model_copy(update={"env": "prod", "intake_mllp_port": 2575})
    [problem] = prod.mllp_problems()
    assert "INTAKE_MLLP_TLS_CERT" in problem and "INTAKE_MLLP_CLIENT_CAS" in problem
    assert problem in prod.production_problems()
    with pytest.raises(SystemExit, match="INTAKE_MLLP_TLS_KEY"):
        hl7_in.OrderListener(engines[0], engines[1], prod, no_temporal, host="0.0.0.0", port=0, tls=None)
    assert settings.model_copy(update={"env": "prod"}).mllp_problems() == []  # no port, no listener


async def test_sender_registration_is_partner_scoped_validated_and_disabled(stack: Stack) -> None:
    a, b = stack.partners["A"], stack.partners["B"]
    app = unique("MIRTH")
    body = {"sending_application": app, "sending_facility": "BAYVIEW",
            "certificate_sha256": fingerprint(stack.pki.mirth)}  # fmt: skip
    other = await stack.http.post(
        f"/v1/partners/{a['partner_id']}/hl7-senders",
        json=body,
        headers={"Authorization": b["Authorization"]},
    )
    assert other.status_code == 404
    bad = await stack.register(
        "A", {**body, "certificate_sha256": None, "certificate_pem": "not a certificate"}
    )
    assert bad.status_code == 422 and "PEM" in bad.json()["detail"]
    bad = await stack.register("A", {**body, "sending_facility": "BAY|VIEW"})
    assert bad.status_code == 422
    created = await stack.register("A", body)
    assert created.status_code == 201
    plain = Hl7SenderCreate(sending_application=app, sending_facility="BAYVIEW")  # no certificate
    with pytest.raises(HTTPException) as refused:
        hl7_senders_api.certificate_fingerprint(plain, "prod")
    assert refused.value.status_code == 422 and "certificate_sha256" in str(refused.value.detail)
    assert (await stack.register("B", body)).status_code == 409  # one sender per identity

    sender_id = created.json()["sender_id"]
    url = f"/v1/partners/{a['partner_id']}/hl7-senders"
    deleted = await stack.http.delete(f"{url}/{sender_id}", headers={"Authorization": a["Authorization"]})
    assert deleted.status_code == 204
    listed = (await stack.http.get(url, headers={"Authorization": a["Authorization"]})).json()
    assert [s["enabled"] for s in listed] == [False]
    ack = await stack.send(
        orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer="O"), stack.pki.mirth
    )
    assert msa(ack)[0] == "AR"


async def test_a_message_that_cannot_be_parsed_is_answered_ar(stack: Stack) -> None:
    app, _ = await stack.mirth()
    message = orm(app=app, facility="BAYVIEW", control_id=unique("C"), placer=unique("O"))
    broken = message.replace(
        "MSH|^~\\&|", "MSH|^^08~\\&|", 1
    )  # python-hl7 asserts on these encoding characters

    ack = await stack.send(broken, stack.pki.mirth)

    assert msa(ack)[0] == "AR", str(ack)
    assert [location for location, _ in errs(ack)] == ["MSH^1"]
    assert stack.cases("A") == []
