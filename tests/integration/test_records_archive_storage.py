"""Storage behind one interface: with RECORDS_STORAGE=dicomweb the images go to a DICOMweb archive (a real
Orthanc here) by STOW-RS and come back by WADO-RS; reports stay on disk; an unreachable archive is a 503
with nothing indexed."""

import io
import uuid
from collections.abc import Iterator
from datetime import date

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CollectRecords, Exam, Patient, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, consumer
from services.records.archive_store import get_storage_settings
from services.records.models import RecordFile
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_port
from tests.keys import operations_headers
from tests.orthanc import PASSWORD, USER, Orthanc, running_orthanc


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("archive"), scp_port=free_port()) as orthanc:
        yield orthanc


@pytest.fixture
def client(engine: Engine, settings: Settings) -> Iterator[TestClient]:
    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("records", routers=[api.router], engine=lambda: engine, max_body_bytes=None)
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c


def use_archive(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("RECORDS_STORAGE", "dicomweb")
    monkeypatch.setenv("RECORDS_ARCHIVE_URL", url)
    monkeypatch.setenv("RECORDS_ARCHIVE_AUTH_ENV", "ARCHIVE_AUTH")
    monkeypatch.setenv("ARCHIVE_AUTH", f"{USER}:{PASSWORD}")
    get_storage_settings.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_storage_settings() -> Iterator[None]:
    yield
    get_storage_settings.cache_clear()


def open_case(engine: Engine, settings: Settings) -> str:
    case_id = str(uuid.uuid4())
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
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 20), facility="Bayview"),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    return case_id


def test_images_live_in_the_archive_and_come_back_byte_for_byte(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    archive: Orthanc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_archive(monkeypatch, archive.dicomweb_url)
    case_id = open_case(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    images = [make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=f) for f in (1, 5)]
    response = client.post(
        f"/v1/records/{case_id}/files",
        files=[("files", ("r.txt", b"IMPRESSION: normal.", "text/plain"))]
        + [("files", (f"{i}.dcm", data, "application/dicom")) for i, data in enumerate(images)],
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "assembled"

    found = httpx.get(f"{archive.dicomweb_url}/studies/{study}/instances", auth=archive.auth, timeout=10)
    assert found.status_code == 200 and len(found.json()) == 2
    with Session(engine) as session:
        rows = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
    assert sorted((r.kind, r.storage_path.startswith("dicomweb:")) for r in rows) == [
        ("dicom", True),
        ("dicom", True),
        ("report", False),
    ]
    clip_row = next(r for r in rows if r.number_of_frames == 5)
    assert not (
        ObjectStore.for_settings(settings).objects_dir / clip_row.sha256[:2] / clip_row.sha256
    ).exists()

    download = client.get(f"/v1/records/{case_id}/files/{clip_row.sha256}")
    assert download.status_code == 200
    served, original = pydicom.dcmread(io.BytesIO(download.content)), pydicom.dcmread(io.BytesIO(images[1]))
    assert served.PixelData == original.PixelData and served.PatientID == f"SO-{case_id}"


def test_an_unreachable_archive_is_a_503_with_nothing_indexed(
    client: TestClient, engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_archive(monkeypatch, f"http://127.0.0.1:{free_port()}/dicom-web")
    case_id = open_case(engine, settings)
    image = make_us_instance(
        None, study_uid="1.2.826.0.1.3680043.10.8", series_uid="1.2.826.0.1.3680043.10.8.1"
    )
    response = client.post(
        f"/v1/records/{case_id}/files", files=[("files", ("a.dcm", image, "application/dicom"))]
    )
    assert response.status_code == 503
    assert "nothing from this upload was indexed" in response.json()["detail"]
    with Session(engine) as session:
        assert session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all() == []
    assert list(ObjectStore.for_settings(settings).tmp_dir.iterdir()) == []
