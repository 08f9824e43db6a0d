"""The whole records path on the real broker: command in on `records`, event out on `case.events`."""

import functools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CollectRecords, Exam, Patient, RecordsAssembled, new_event
from services.common import migrate
from services.common.amqp import COMMANDS, EVENTS, Consumer, OutboxRelay, Publisher, connect, ensure_topology
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, consumer
from services.records.models import RecordRequest
from tests.dicom_factory import make_us_instance
from tests.keys import operations_headers


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture
def running_service(engine: Engine, settings: Settings) -> Iterator[None]:
    """The records consumer and outbox relay threads, as the service process runs them."""
    ensure_topology(settings)
    relay = OutboxRelay(settings=settings, engine=engine, interval=0.2)
    records = Consumer(
        settings=settings,
        queue="records",
        engine=engine,
        handle=functools.partial(consumer.handle, settings=settings),
        on_commit=relay.wake,
    )
    threads = [threading.Thread(target=t.run_forever, daemon=True) for t in (relay, records)]
    for thread in threads:
        thread.start()
    assert records.connected.wait(10), "the consumer did not connect to the broker"
    try:
        yield
    finally:
        records.stop()
        relay.stop()
        for thread in threads:
            thread.join(timeout=5)


def wait_for(condition, timeout: float = 10):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def test_collect_command_then_upload_publishes_records_assembled(
    engine: Engine, settings: Settings, running_service: None
) -> None:
    case_id = str(uuid.uuid4())
    conn = connect(settings)
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS, routing_key="records.assembled")

    command = CollectRecords(
        case_id=case_id,
        patient=Patient(
            family_name="Doe",
            given_name="Jane",
            birth_date=date(1980, 1, 1),
            sex="female",
            mrn="MRN1",
            state="CA",
        ),
        exam=Exam(exam_type="obstetric", performed_on=date(2026, 11, 20), facility="Bayview Imaging"),
    )
    publisher = Publisher(settings)
    publisher.publish(
        COMMANDS, new_event(id=f"case-{case_id}:1", source="/workflows/case", data=command, subject=case_id)
    )
    publisher.close()

    def request_exists() -> bool:
        with Session(engine) as session:
            return session.get(RecordRequest, case_id) is not None

    wait_for(request_exists)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("records", routers=[api.router], engine=lambda: engine, max_body_bytes=None)
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    study = "1.2.826.0.1.3680043.10.4242"
    with TestClient(app, headers=operations_headers(settings)) as client:
        response = client.post(
            f"/v1/records/{case_id}/files",
            files=[
                ("files", ("report.txt", b"IMPRESSION: single live intrauterine pregnancy.", "text/plain")),
                (
                    "files",
                    (
                        "clip.dcm",
                        make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=4),
                        "application/dicom",
                    ),
                ),
            ],
        )
    assert response.status_code == 201, response.text

    def assembled_message():  # type: ignore[no-untyped-def]
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return None
            if json.loads(body)["subject"] == case_id:
                return props, json.loads(body)

    try:
        props, envelope = wait_for(assembled_message)
    finally:
        conn.close()
    assert props.message_id == envelope["id"] == f"records.assembled:{case_id}"
    assert (envelope["type"], envelope["source"]) == ("records.assembled", "/services/records")
    event = RecordsAssembled.model_validate(envelope["data"])
    assert event.report.text == "IMPRESSION: single live intrauterine pregnancy."
    assert (event.study.study_instance_uid, event.study.instance_count, event.study.multiframe_count) == (
        study,
        1,
        1,
    )
