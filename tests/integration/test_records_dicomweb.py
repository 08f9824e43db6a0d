"""DICOMweb on the records service, exercised with the third-party `dicomweb-client` over real HTTP:
STOW-RS into the validated, reconciled import path, then QIDO-RS and WADO-RS over what was released."""

import io
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date

import pydicom
import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CollectRecords, Exam, Patient, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, consumer, dicomweb
from services.records.models import RecordFile
from tests.dicom_factory import make_us_instance
from tests.infra import free_port
from tests.keys import operations_headers


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@pytest.fixture(scope="module")
def base_url(engine: Engine, settings: Settings) -> Iterator[str]:
    """The records API and DICOMweb routes served by uvicorn on a free loopback port."""
    port = free_port()
    served = settings.model_copy(update={"records_url": f"http://127.0.0.1:{port}"})

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("records", routers=[api.router, dicomweb.router], engine=lambda: engine)
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: served
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield served.records_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def open_case(engine: Engine, settings: Settings, study_uid: str | None = None) -> str:
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
        exam=Exam(
            exam_type="pelvic",
            performed_on=date(2026, 11, 20),
            facility="Bayview",
            study_instance_uid=study_uid,
        ),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    return case_id


def new_study() -> str:
    return f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"


def instances(study: str, birth_date: str = "19800101") -> list[pydicom.Dataset]:
    """Two images and a cine clip of one study."""
    return [
        pydicom.dcmread(
            io.BytesIO(
                make_us_instance(
                    None, study_uid=study, series_uid=study + ".1", frames=frames, birth_date=birth_date
                )
            )
        )
        for frames in (1, 1, 4)
    ]


def test_stow_then_qido_and_wado_with_a_third_party_client(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    study = new_study()
    sent = instances(study)
    client = DICOMwebClient(url=f"{base_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings))

    stored = client.store_instances(sent)
    assert len(stored.ReferencedSOPSequence) == 3
    assert "WarningReason" not in stored

    [found] = client.search_for_studies()
    assert found["0020000D"]["Value"] == [study]
    assert found["00100020"]["Value"] == [f"SO-{case_id}"]
    assert found["00201208"]["Value"] == [3]
    [series] = client.search_for_series(study)
    assert series["0020000E"]["Value"] == [study + ".1"]
    listed = client.search_for_instances(study, study + ".1")
    assert sorted(i["00080018"]["Value"][0] for i in listed) == sorted(d.SOPInstanceUID for d in sent)

    clip = sent[2]
    fetched = client.retrieve_instance(study, study + ".1", clip.SOPInstanceUID)
    assert fetched.PixelData == clip.PixelData and fetched.NumberOfFrames == 4
    assert (fetched.PatientID, fetched.IssuerOfPatientID) == (f"SO-{case_id}", "SECONDOPINION")
    assert fetched.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientID == "MRN1"
    metadata = client.retrieve_study_metadata(study)
    assert len(metadata) == 3 and all(m["00100020"]["Value"] == [f"SO-{case_id}"] for m in metadata)
    assert len(client.retrieve_study(study)) == 3

    with Session(engine) as session:
        assert len(session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()) == 3


def test_a_stow_of_another_patient_is_held_and_not_searchable(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    study = new_study()
    client = DICOMwebClient(url=f"{base_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings))
    stored = client.store_instances(instances(study, birth_date="19790101"))
    assert [item.WarningReason for item in stored.ReferencedSOPSequence] == [0xB000] * 3  # per item
    assert "RetrieveURL" in stored  # Type 2 at the top level (PS3.18 Table I.1-1)
    assert client.search_for_studies() == []
    response = requests.get(
        f"{base_url}/v1/records/{case_id}", headers=operations_headers(settings), timeout=10
    ).json()
    assert response["imports"][0]["differences"] == ["PatientBirthDate"]


def test_the_root_stow_finds_the_case_by_its_requested_study_uid(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    study = new_study()
    case_id = open_case(engine, settings, study_uid=study)
    DICOMwebClient(url=f"{base_url}/dicomweb", headers=operations_headers(settings)).store_instances(
        instances(study)
    )
    records = requests.get(
        f"{base_url}/v1/records/{case_id}", headers=operations_headers(settings), timeout=10
    ).json()
    assert len(records["files"]) == 3

    unknown = DICOMwebClient(url=f"{base_url}/dicomweb", headers=operations_headers(settings))
    with pytest.raises(requests.HTTPError) as caught:
        unknown.store_instances(instances(new_study()))
    assert caught.value.response is not None and caught.value.response.status_code == 404


def test_bad_stow_bodies_are_refused_with_nothing_stored(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    url = f"{base_url}/dicomweb/cases/{case_id}/studies"
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + b"not dicom at all" * 20
        + f"\r\n--{boundary}--\r\n".encode()
    )
    related = f'multipart/related; type="application/dicom"; boundary={boundary}'
    refused = requests.post(
        url, data=body, headers={"Content-Type": related, **operations_headers(settings)}, timeout=10
    )
    assert refused.status_code == 422 and "part 1 of the request is not DICOM" in refused.json()["detail"]
    wrong_type = requests.post(
        url,
        data=b"{}",
        headers={"Content-Type": "application/json", **operations_headers(settings)},
        timeout=10,
    )
    assert wrong_type.status_code == 415
    truncated = requests.post(
        url, data=body[:60], headers={"Content-Type": related, **operations_headers(settings)}, timeout=10
    )
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    assert (
        requests.get(
            f"{base_url}/v1/records/{case_id}", headers=operations_headers(settings), timeout=10
        ).json()["files"]
        == []
    )


def test_what_a_viewer_and_a_dicomweb_client_need(base_url: str, engine: Engine, settings: Settings) -> None:
    """OHIF / dicomweb-client: frames, PixelData as Bulkdata in the metadata, Accept honoured with 406,
    one instance per SOP Instance UID, a 409 with reasons for another study, the required QIDO attributes."""
    case_id = open_case(engine, settings)
    study = new_study()
    headers = operations_headers(settings)
    root = f"{base_url}/dicomweb/cases/{case_id}"
    client = DICOMwebClient(url=root, headers=headers)
    sent = instances(study)
    client.store_instances(sent)
    clip = sent[2]
    series, sop = clip.SeriesInstanceUID, clip.SOPInstanceUID

    metadata = client.retrieve_instance_metadata(study, series, sop)
    assert metadata["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/frames/1,2,3,4")
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1, 4])
    size = len(clip.PixelData) // 4
    assert frames == [clip.PixelData[:size], clip.PixelData[3 * size :]]

    xml = requests.get(f"{root}/studies", headers={**headers, "Accept": "application/dicom+xml"}, timeout=10)
    assert xml.status_code == 406
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    url = f"{root}/studies/{study}/series/{series}/instances/{sop}"
    assert requests.get(url, headers={**headers, "Accept": jpeg}, timeout=10).status_code == 406

    corrected = sent[0].copy()
    corrected.StudyDescription = "corrected"
    client.store_instances([corrected])  # the same instance again, other bytes
    assert len(client.search_for_instances(study)) == 3
    assert client.retrieve_instance(study, series, sent[0].SOPInstanceUID).StudyDescription == "corrected"

    with pytest.raises(requests.HTTPError) as caught:
        DICOMwebClient(url=root, headers=headers).store_instances(sent[:1], study_instance_uid="1.2.3.4")
    refused = caught.value.response
    assert refused is not None and refused.status_code == 409
    assert pydicom.Dataset.from_json(refused.json()).FailedSOPSequence[0].FailureReason == 0xA901

    [found] = client.search_for_studies()
    assert found["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}] and "00080056" in found
    assert client.search_for_studies(search_filters={"PatientID": "someone-else"}) == []
    assert client.search_for_series(study, search_filters={"SeriesInstanceUID": "1.2.3"}) == []
    [listed] = client.search_for_series(study)
    assert listed["00200011"]["Value"] == [1] and "00081190" in listed
    assert all("00200013" in i for i in client.search_for_instances(study))
