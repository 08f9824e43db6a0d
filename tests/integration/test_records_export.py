"""De-identified export of a case's released images (PS3.15 Annex E basic profile) through the API."""

import io
import json
import re
import uuid
import zipfile
from collections.abc import Iterator
from datetime import date

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CollectRecords, Exam, Patient, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, consumer, export
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.keys import operations_headers

PHI = (b"DOE", b"JANE", b"MRN1", b"19800101", b"ACC-EXPORT-1")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[tuple[TestClient, Engine]]:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "records", routers=[api.router, export.router], engine=lambda: engine, max_body_bytes=None
    )
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c, engine


def test_the_export_removes_identity_keeps_pixels_and_withholds_burned_in_images(
    client: tuple[TestClient, Engine], settings: Settings
) -> None:
    http, engine = client
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
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    clean = make_us_instance(
        None, study_uid=study, series_uid=study + ".1", frames=3, accession_number="ACC-EXPORT-1"
    )
    burned = make_us_instance(None, study_uid=study, series_uid=study + ".1", burned_in_annotation="YES")
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[
            ("files", ("a.dcm", clean, "application/dicom")),
            ("files", ("b.dcm", burned, "application/dicom")),
        ],
    )
    assert response.status_code == 201, response.text

    anonymous = http.get(f"/v1/records/{case_id}/export/deidentified", headers={"Authorization": ""})
    assert anonymous.status_code == 401  # no key, no images
    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        [instance_name] = [n for n in names if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
        dicomdir = pydicom.dcmread(io.BytesIO(archive.read("DICOMDIR")))
    # IHE PDI / PS3.10: a DICOMDIR at the root whose file IDs name the instances (8 chars, no extension)
    [referenced] = [r.ReferencedFileID for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert "/".join(referenced) == instance_name
    assert all(re.fullmatch(r"[A-Z0-9_]{1,8}", part) for part in referenced)
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        data = archive.read(instance_name)
    assert (manifest["exported"], manifest["withheld"]) == (1, 1)
    assert manifest["method_codes"][0]["code_value"] == "113100"
    assert not any(value in data for value in PHI)
    ds, original = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(clean))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.StudyInstanceUID != study and ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.PixelData == original.PixelData and ds.NumberOfFrames == 3
    assert "SequenceOfUltrasoundRegions" in ds  # calibration is not identity: kept for teaching
    assert list(ObjectStore.for_settings(settings).tmp_dir.glob("export-*")) == []  # removed after sending
