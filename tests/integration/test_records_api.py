"""Records against the real PostgreSQL: uploads through the API, commands through consumer.handle."""

import io
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import CloudEvent, CollectRecords, Exam, Patient, RecordsAssembled, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import create_app
from services.records import api, consumer
from services.records.models import RecordFile, RecordRequest
from services.records.store import ObjectStore
from tests.dicom_factory import make_pdf_report, make_us_instance
from tests.keys import operations_headers

REPORT = "FINDINGS: 4.1 cm complex left adnexal cyst with a thick septation.\nIMPRESSION: O-RADS US 4."


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture(scope="module")
def client(engine: Engine, settings: Settings) -> Iterator[TestClient]:
    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("records", routers=[api.router], engine=lambda: engine, max_body_bytes=None)
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c


def collect_command(case_id: str, message_id: str | None = None) -> CloudEvent:
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
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 20), facility="Bayview Imaging"),
    )
    return new_event(
        id=message_id or f"case-{case_id}:collect-records",
        source="/workflows/case",
        data=command,
        subject=case_id,
    )


def handle(engine: Engine, settings: Settings, event: CloudEvent) -> None:
    with Session(engine) as session:
        consumer.handle(session, event, settings)
        session.commit()


@pytest.fixture
def case_id(engine: Engine, settings: Settings) -> str:
    """A case whose records.collect command has been handled."""
    case_id = str(uuid.uuid4())
    handle(engine, settings, collect_command(case_id))
    return case_id


def assembled_events(engine: Engine, case_id: str) -> list[RecordsAssembled]:
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.routing_key == "records.assembled")).all()
    events = [CloudEvent.model_validate_json(row.body) for row in rows]
    return [RecordsAssembled.model_validate(e.data) for e in events if e.subject == case_id]


def file_rows(engine: Engine, case_id: str) -> list[RecordFile]:
    with Session(engine) as session:
        return list(session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all())


def stored_objects(settings: Settings) -> set[Path]:
    return {p for p in ObjectStore.for_settings(settings).objects_dir.rglob("*") if p.is_file()}


def us(study: str, series: str, frames: int = 1, modality: str = "US") -> bytes:
    return make_us_instance(None, study_uid=study, series_uid=series, frames=frames, modality=modality)


def upload(client: TestClient, case_id: str, *files: tuple[str, bytes, str]):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/records/{case_id}/files", files=[("files", f) for f in files])


def test_report_and_ultrasound_images_assemble_the_records(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    clip = us(study, study + ".2", frames=3)
    response = upload(
        client,
        case_id,
        ("report.txt", REPORT.encode(), "text/plain"),
        ("img1.dcm", us(study, study + ".1"), "application/dicom"),
        ("clip.dcm", clip, "application/octet-stream"),
        ("ct.dcm", us("1.2.3.999", "1.2.3.999.1", modality="CT"), "application/dicom"),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["missing"], body["new_files"]) == ("assembled", [], 4)
    assert [f["kind"] for f in body["files"]] == ["report", "dicom", "dicom", "dicom"]
    assert [f["modality"] for f in body["files"]] == [None, "US", "US", "CT"]

    [event] = assembled_events(engine, case_id)
    assert event.report.text == REPORT
    assert event.report.content_type == "text/plain; charset=utf-8"
    assert event.study.model_dump() == {
        "study_instance_uid": study,
        "modality": "US",
        "instance_count": 2,
        "multiframe_count": 1,
        "series_count": 2,
    }
    assert event.file_count == 4

    records = client.get(f"/v1/records/{case_id}").json()
    assert records["status"] == "assembled" and len(records["files"]) == 4
    clip_sha = body["files"][2]["sha256"]
    download = client.get(f"/v1/records/{case_id}/files/{clip_sha}")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/dicom"
    served, original = pydicom.dcmread(io.BytesIO(download.content)), pydicom.dcmread(io.BytesIO(clip))
    assert (served.PatientID, served.IssuerOfPatientID) == (f"SO-{case_id}", "SECONDOPINION")
    [coercion] = served.OriginalAttributesSequence
    assert coercion.ReasonForTheAttributeModification == "COERCE"
    assert coercion.ModifiedAttributesSequence[0].PatientID == "MRN1"
    assert served.PixelData == original.PixelData and served.SOPInstanceUID == original.SOPInstanceUID


def test_records_assembled_is_enqueued_once_per_case(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    study = "1.2.826.0.1.3680043.10.77"
    assert (
        upload(
            client,
            case_id,
            ("r.txt", b"IMPRESSION: normal.", "text/plain"),
            ("a.dcm", us(study, study + ".1"), "application/dicom"),
        ).status_code
        == 201
    )
    with Session(engine) as session:
        assembled_at = session.get(RecordRequest, case_id).assembled_at  # type: ignore[union-attr]
    # A later upload and a redelivered command (new message id) change nothing about the assembly.
    assert upload(client, case_id, ("b.dcm", us(study, study + ".1"), "application/dicom")).status_code == 201
    handle(engine, settings, collect_command(case_id, message_id="retried-activity"))

    assert len(assembled_events(engine, case_id)) == 1
    with Session(engine) as session:
        assert session.get(RecordRequest, case_id).assembled_at == assembled_at  # type: ignore[union-attr]
    assert client.get(f"/v1/records/{case_id}").json()["status"] == "assembled"


def test_a_pdf_report_is_sent_as_its_text(client: TestClient, engine: Engine, case_id: str) -> None:
    pdf = make_pdf_report(REPORT + f"\nCase {case_id}")
    response = upload(
        client,
        case_id,
        ("report.pdf", pdf, "application/pdf"),
        ("a.dcm", us("1.2.3.5", "1.2.3.5.1"), "application/dicom"),
    )
    assert response.status_code == 201, response.text
    [event] = assembled_events(engine, case_id)
    assert event.report.content_type == "application/pdf"
    assert event.report.text == REPORT + f"\nCase {case_id}"
    download = client.get(f"/v1/records/{case_id}/files/{event.report.sha256}")
    assert (download.headers["content-type"], download.content) == ("application/pdf", pdf)


def test_head_of_a_download_answers_its_headers_without_reading_the_file(
    client: TestClient, engine: Engine, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy or viewer checking a file's size with HEAD gets the GET's headers; the stored file is neither
    read (a PDF) nor coerced (an image): HeadAsGet alone answered HEAD by producing the whole GET and
    dropping its body."""
    pdf = make_pdf_report(REPORT)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    response = upload(
        client,
        case_id,
        ("report.pdf", pdf, "application/pdf"),
        ("a.dcm", us(study, study + ".1", frames=4), "application/dicom"),
    )
    assert response.status_code == 201, response.text
    report_sha, image_sha = (f["sha256"] for f in response.json()["files"])
    opened: list[object] = []
    open_file = anyio.open_file

    async def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0])
        return await open_file(*args, **kwargs)

    handed_out = api._handed_out

    def counting_handed_out(*args: Any) -> Iterator[bytes]:
        opened.append("coerced")
        yield from handed_out(*args)

    monkeypatch.setattr(anyio, "open_file", counting)
    monkeypatch.setattr(api, "_handed_out", counting_handed_out)

    head = client.head(f"/v1/records/{case_id}/files/{report_sha}")
    assert (head.status_code, head.content, head.headers["content-type"]) == (200, b"", "application/pdf")
    assert head.headers["content-length"] == str(len(pdf))
    image_head = client.head(f"/v1/records/{case_id}/files/{image_sha}")
    assert (image_head.status_code, image_head.content) == (200, b"")
    assert image_head.headers["content-type"] == "application/dicom"
    assert opened == []
    assert client.head(f"/v1/records/{case_id}/files/{'0' * 64}").status_code == 404  # as the GET
    assert client.get(f"/v1/records/{case_id}/files/{report_sha}").content == pdf
    assert (
        pydicom.dcmread(
            io.BytesIO(client.get(f"/v1/records/{case_id}/files/{image_sha}").content)
        ).NumberOfFrames
        == 4
    )
    assert len(opened) == 2  # the GETs read them


def test_a_non_dicom_file_refuses_the_whole_upload(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    before = stored_objects(settings)
    response = upload(
        client,
        case_id,
        ("report.txt", f"{REPORT} {case_id}".encode(), "text/plain"),
        ("a.dcm", us("1.2.3.6", "1.2.3.6.1"), "application/dicom"),
        ("DOE^JANE_MRN1.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png"),
    )
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "file 3 of 3 is not DICOM (no DICM prefix); nothing from this upload was stored"
    )
    assert "DOE" not in response.text
    assert file_rows(engine, case_id) == []
    assert stored_objects(settings) == before
    assert list(ObjectStore.for_settings(settings).tmp_dir.iterdir()) == []
    assert assembled_events(engine, case_id) == []


def test_the_same_file_uploaded_again_is_kept_once(client: TestClient, engine: Engine, case_id: str) -> None:
    image = us("1.2.3.7", "1.2.3.7.1")
    first = upload(
        client, case_id, ("a.dcm", image, "application/dicom"), ("b.dcm", image, "application/dicom")
    )
    again = upload(client, case_id, ("a.dcm", image, "application/dicom"))
    assert (first.status_code, again.status_code) == (201, 201)
    assert (first.json()["new_files"], first.json()["duplicates"]) == (1, 1)
    assert (again.json()["new_files"], again.json()["duplicates"]) == (0, 1)
    assert again.json()["files"] == first.json()["files"]
    assert len(file_rows(engine, case_id)) == 1
    assert again.json()["missing"] == [
        "the original report (PDF, UTF-8 text, DICOM SR or FHIR DiagnosticReport)"
    ]


def test_unknown_case_is_404(client: TestClient, settings: Settings) -> None:
    unknown = str(uuid.uuid4())
    response = upload(client, unknown, ("r.txt", b"IMPRESSION: normal.", "text/plain"))
    assert response.status_code == 404
    assert "records can be uploaded once the case is awaiting records" in response.json()["detail"]
    assert client.get(f"/v1/records/{unknown}").status_code == 404
    assert client.get(f"/v1/records/{unknown}/files/{'0' * 64}").status_code == 404


def test_ct_images_do_not_complete_the_records(client: TestClient, engine: Engine, case_id: str) -> None:
    response = upload(
        client,
        case_id,
        ("r.txt", b"IMPRESSION: see CT.", "text/plain"),
        ("ct.dcm", us("1.2.3.8", "1.2.3.8.1", modality="CT"), "application/dicom"),
    )
    assert response.status_code == 201
    assert response.json()["status"] == "requested"
    assert response.json()["missing"] == ["an ultrasound image (a DICOM instance with Modality US)"]
    assert assembled_events(engine, case_id) == []
    assert len(file_rows(engine, case_id)) == 2


def test_a_file_over_the_size_limit_is_413(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 2048})
    client.app.dependency_overrides[get_settings] = lambda: small  # type: ignore[attr-defined]
    try:
        response = upload(
            client,
            case_id,
            ("r.txt", b"IMPRESSION: normal.", "text/plain"),
            ("a.dcm", us("1.2.3.9", "1.2.3.9.1"), "application/dicom"),
        )
    finally:
        client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "file 2 of 2 is larger than the 2 KiB limit; nothing from this upload was stored"
    )
    assert file_rows(engine, case_id) == []
    assert list(ObjectStore.for_settings(settings).tmp_dir.iterdir()) == []


def test_collect_is_idempotent(engine: Engine, settings: Settings) -> None:
    case_id = str(uuid.uuid4())
    handle(engine, settings, collect_command(case_id, "m1"))
    handle(engine, settings, collect_command(case_id, "m2"))
    with Session(engine) as session:
        rows = session.exec(select(RecordRequest).where(col(RecordRequest.case_id) == case_id)).all()
    assert len(rows) == 1
    assert rows[0].exam["exam_type"] == "pelvic" and rows[0].assembled_at is None


def test_unknown_or_malformed_commands_are_poison(engine: Engine, settings: Settings) -> None:
    good = collect_command(str(uuid.uuid4()))
    with Session(engine) as session:
        with pytest.raises(PoisonMessage, match="records does not handle 'records.shred'"):
            consumer.handle(session, good.model_copy(update={"type": "records.shred"}), settings)
        with pytest.raises(PoisonMessage, match=r"records.collect data is invalid \(1 error\(s\): patient\)"):
            consumer.handle(
                session, good.model_copy(update={"data": {**good.data, "patient": None}}), settings
            )
        with pytest.raises(PoisonMessage, match="is about case another-case but its data names another case"):
            consumer.handle(session, good.model_copy(update={"subject": "another-case"}), settings)
