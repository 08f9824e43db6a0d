"""DICOMweb on the records service, exercised with the third-party `dicomweb-client` over real HTTP:
STOW-RS into the validated, reconciled import path, then QIDO-RS and WADO-RS over what was released."""

import contextlib
import hashlib
import io
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import pydicom
import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CollectRecords, Exam, Patient, new_event
from contracts.events import CaseCancelled
from services.auth import access, audit, tenancy
from services.auth.audit_chain import entry_hash
from services.auth.read_windows import ReadWindows
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import get_engine, make_engine
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID
from services.common.http import create_app
from services.records import api, consumer, dicomweb
from services.records.limits import ImportLimits, get_limits
from services.records.models import RecordFile
from services.records.qido_keys import QueryKeysByKeyword
from services.records.store import ObjectStore
from services.records.viewer_cors import ViewerCors
from tests.dicom_factory import make_us_instance
from tests.hostile_corpus import with_uid
from tests.infra import free_port
from tests.keys import operations_headers, specialist_headers


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)
    return engine


@contextlib.contextmanager
def serving(
    engine: Engine,
    settings: Settings,
    limits: ImportLimits | None = None,
    overrides: dict[Callable[..., Any], Callable[..., Any]] | None = None,
) -> Iterator[str]:
    """The records API and DICOMweb routes served by uvicorn on a free loopback port (`overrides`: more
    dependency overrides)."""
    port = free_port()
    served = settings.model_copy(update={"records_url": f"http://127.0.0.1:{port}"})

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "records", routers=[api.router, dicomweb.router], engine=lambda: engine, max_body_bytes=None
    )
    app.add_middleware(QueryKeysByKeyword)
    app.add_middleware(ViewerCors, origins=served.viewer_origins)  # as services.records.main does
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: served
    if limits is not None:
        app.dependency_overrides[get_limits] = lambda: limits
    app.dependency_overrides.update(overrides or {})
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


@pytest.fixture(scope="module")
def base_url(engine: Engine, settings: Settings) -> Iterator[str]:
    with serving(engine, settings) as url:
        yield url


@pytest.fixture(scope="module")
def small_parts_url(engine: Engine, settings: Settings) -> Iterator[str]:
    """The same routes where one instance may be at most 32 KiB (MAX_UPLOAD_BYTES) and one request 1 MiB
    (RECORDS_MAX_ARCHIVE_TOTAL_BYTES)."""
    small = settings.model_copy(update={"max_upload_bytes": 32 * 1024})
    with serving(engine, small, ImportLimits(max_archive_total_bytes=1024**2)) as url:
        yield url


def open_case(
    engine: Engine, settings: Settings, study_uid: str | None = None, accession_number: str | None = None
) -> str:
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
            accession_number=accession_number,
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
    assert "WarningReason" not in stored  # a Warning Reason belongs to each item (PS3.18 Table I.1-1)

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
    # We rewrote the header, so the copy's file meta names us as its writer (PS3.10 7.1), not the modality.
    assert fetched.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fetched.file_meta.SourceApplicationEntityTitle == "SECONDOPINION"
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


def stow(
    url: str, settings: Settings, *parts: tuple[str, bytes], boundary: str = "b0undary"
) -> requests.Response:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for kind, data in parts
    )
    related = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return requests.post(
        url,
        data=body + f"--{boundary}--\r\n".encode(),
        headers={"Content-Type": related, **operations_headers(settings)},
        timeout=10,
    )


def encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_bad_stow_requests_are_400_or_415_and_unusable_instances_409(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """PS3.18 10.5.3: a malformed request 400, a media type not accepted 415, nothing usable 409 with each
    instance's Failure Reason; never a 500, nothing stored."""
    case_id = open_case(engine, settings)
    url = f"{base_url}/dicomweb/cases/{case_id}/studies"
    headers = operations_headers(settings)
    refused = stow(url, settings, ("application/dicom", b"not dicom at all" * 20))
    assert refused.status_code == 409 and refused.headers["content-type"] == "application/dicom+json"
    [failed] = pydicom.Dataset.from_json(refused.json()).FailedSOPSequence
    assert failed.FailureReason == 0xC000 and "ReferencedSOPSequence" not in refused.json()
    assert "part 1 of the request is not DICOM" in refused.headers["warning"]

    wrong_type = requests.post(
        url, data=b"{}", headers={"Content-Type": "application/json", **headers}, timeout=10
    )
    assert wrong_type.status_code == 415
    json_part = stow(url, settings, ("application/dicom+json", b"{}"))
    assert json_part.status_code == 415 and "not application/dicom" in json_part.json()["detail"]
    body = f"--b0undary\r\nContent-Type: application/dicom\r\n\r\n{'x' * 40}".encode()
    related = 'multipart/related; type="application/dicom"; boundary=b0undary'
    truncated = requests.post(url, data=body, headers={"Content-Type": related, **headers}, timeout=10)
    assert truncated.status_code == 400 and "truncated" in truncated.json()["detail"]
    garbled = requests.post(
        url,
        data=b"--b0undary\r\n\x00\x01 no headers",
        headers={"Content-Type": related, **headers},
        timeout=10,
    )
    empty = requests.post(
        url, data=b"--b0undary--\r\n", headers={"Content-Type": related, **headers}, timeout=10
    )
    no_boundary = requests.post(
        url,
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"', **headers},
        timeout=10,
    )
    assert (garbled.status_code, empty.status_code, no_boundary.status_code) == (400, 400, 400)
    # A boundary longer than the multipart parser takes was a 500 (its FormParserError escaped).
    long_boundary = stow(url, settings, ("application/dicom", b"x" * 40), boundary="b" * 300)
    assert long_boundary.status_code == 400 and "boundary is longer than" in long_boundary.json()["detail"]
    assert requests.get(f"{base_url}/v1/records/{case_id}", headers=headers, timeout=10).json()["files"] == []


def test_a_stow_stores_what_it_can_and_says_why_not_for_the_rest(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """202: the usable instances stored (ReferencedSOPSequence, RetrieveURL, the coercion warning), each
    other one in FailedSOPSequence with its reason; nothing of a failed instance is kept."""
    case_id = open_case(engine, settings)
    study = new_study()
    good, no_modality, other_study = instances(study)
    del no_modality.Modality
    other_study.StudyInstanceUID = new_study()
    url = f"{base_url}/dicomweb/cases/{case_id}/studies/{study}"
    answer = stow(
        url,
        settings,
        ("application/dicom", encoded(good)),
        ("application/dicom", encoded(no_modality)),
        ("application/dicom", b"\0" * 128 + b"DICM" + b"\xff" * 64),
        ("application/dicom", encoded(other_study)),
    )
    assert answer.status_code == 202 and answer.headers["content-type"] == "application/dicom+json"
    result = pydicom.Dataset.from_json(answer.json())
    [stored] = result.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == good.SOPInstanceUID
    assert stored.RetrieveURL.endswith(
        f"/studies/{study}/series/{good.SeriesInstanceUID}/instances/{good.SOPInstanceUID}"
    )
    assert stored.WarningReason == 0xB000  # handed out with our Patient ID and Accession Number
    assert result.RetrieveURL.endswith(f"/studies/{study}")
    failures = [(f.get("ReferencedSOPInstanceUID"), f.FailureReason) for f in result.FailedSOPSequence]
    assert failures == [
        (no_modality.SOPInstanceUID, 0xA900),
        ("", 0xC000),  # nothing readable names it: present, empty
        (other_study.SOPInstanceUID, 0xA901),
    ]
    assert (
        "part 2 of the request is DICOM without a valid Modality; it was not stored"
        in answer.headers["warning"]
    )
    assert "DOE" not in answer.text and "DOE" not in answer.headers["warning"]  # no PHI in what is refused
    with Session(engine) as session:
        kept = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
    assert [f.sop_instance_uid for f in kept] == [good.SOPInstanceUID]

    # The third-party client takes a 202 as stored (with warnings) and a 409 as an error.
    client = DICOMwebClient(url=f"{base_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings))
    again = client.store_instances([good, other_study], study_instance_uid=study)
    assert [f.FailureReason for f in again.FailedSOPSequence] == [0xA901]
    with pytest.raises(requests.HTTPError) as caught:
        client.store_instances([no_modality])
    assert caught.value.response is not None and caught.value.response.status_code == 409


def test_an_instance_whose_uids_a_wado_url_cannot_name_is_refused_on_its_own(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """A UID is digits and dots (PS3.5 9.1). One with letters, a slash or two values (a backslash) was
    stored, listed by QIDO-RS with a RetrieveURL that WADO-RS refuses (422), and, with an archive behind the
    store, named a reference that could not be split back; now it is refused with A900, the rest stored."""
    case_id = open_case(engine, settings)
    study = new_study()
    good = instances(study)[0]
    url = f"{base_url}/dicomweb/cases/{case_id}/studies"
    answer = stow(
        url,
        settings,
        ("application/dicom", encoded(good)),
        ("application/dicom", with_uid("SOPInstanceUID", b"1.2.3\\4.5")),
        ("application/dicom", with_uid("SeriesInstanceUID", b"1.2.840.ABC/1")),
    )
    assert answer.status_code == 202, answer.text
    result = pydicom.Dataset.from_json(answer.json())
    assert [r.ReferencedSOPInstanceUID for r in result.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert [f.FailureReason for f in result.FailedSOPSequence] == [0xA900, 0xA900]
    assert "part 2 of the request is DICOM without a valid SOPInstanceUID" in answer.headers["warning"]
    assert "part 3 of the request is DICOM without a valid SeriesInstanceUID" in answer.headers["warning"]
    with Session(engine) as session:
        kept = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
    assert [f.sop_instance_uid for f in kept] == [good.SOPInstanceUID]
    [stored] = result.ReferencedSOPSequence
    served = requests.get(
        stored.RetrieveURL,
        headers={"Accept": "application/dicom", **operations_headers(settings)},
        timeout=10,
    )
    assert served.status_code == 200


def test_an_instance_over_the_size_limit_is_refused_on_its_own(
    small_parts_url: str, engine: Engine, settings: Settings
) -> None:
    """PS3.18 10.5.3: an instance larger than one may be is refused alone with A700 (Out of Resources), named
    by its File Meta Information, while the others of the request are stored (202); a request of only such
    instances is 409. Its bytes are read past as they arrive: nothing of it is on disk afterwards."""
    case_id = open_case(engine, settings)
    study = new_study()
    first, second = instances(study)[:2]
    big = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=32))
    )  # 128 KiB: arrives in several chunks
    store = ObjectStore.for_settings(settings)
    objects_before = set(store.objects_dir.rglob("*"))
    url = f"{small_parts_url}/dicomweb/cases/{case_id}/studies"

    answer = stow(
        url,
        settings,
        ("application/dicom", encoded(first)),
        ("application/dicom", encoded(big)),
        ("application/dicom", encoded(second)),
    )

    assert answer.status_code == 202 and answer.headers["content-type"] == "application/dicom+json"
    result = pydicom.Dataset.from_json(answer.json())
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert stored == [first.SOPInstanceUID, second.SOPInstanceUID]  # the part after it is stored too
    [failed] = result.FailedSOPSequence
    assert (failed.ReferencedSOPClassUID, failed.ReferencedSOPInstanceUID, failed.FailureReason) == (
        big.SOPClassUID,
        big.SOPInstanceUID,
        0xA700,
    )
    assert "part 2 of the request is" in answer.headers["warning"]
    assert "more than the 32 KiB one instance may be" in answer.headers["warning"]
    client = DICOMwebClient(
        url=f"{small_parts_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings)
    )
    fetched = client.retrieve_instance(study, first.SeriesInstanceUID, first.SOPInstanceUID)
    assert fetched.PixelData == first.PixelData
    with Session(engine) as session:
        kept = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
    assert [f.sop_instance_uid for f in kept] == [first.SOPInstanceUID, second.SOPInstanceUID]
    added = {p.name for p in set(store.objects_dir.rglob("*")) - objects_before if p.is_file()}
    assert added == {hashlib.sha256(encoded(d)).hexdigest() for d in (first, second)}
    assert list(store.tmp_dir.iterdir()) == []

    only_too_large = stow(
        url, settings, ("application/dicom", encoded(big)), ("application/dicom", b"\xff" * 100_000)
    )
    assert only_too_large.status_code == 409
    failures = pydicom.Dataset.from_json(only_too_large.json()).FailedSOPSequence
    assert [(f.get("ReferencedSOPInstanceUID"), f.FailureReason) for f in failures] == [
        (big.SOPInstanceUID, 0xA700),
        ("", 0xA700),  # nothing in its first bytes names it: present, empty
    ]
    assert "ReferencedSOPSequence" not in only_too_large.json()
    assert list(store.tmp_dir.iterdir()) == []

    # Parts read past still arrive: over the bound on a whole request, it is refused whole.
    endless = stow(
        url, settings, ("application/dicom", encoded(first)), ("application/dicom", b"\0" * 1100 * 1024)
    )
    assert endless.status_code == 413
    assert (
        "larger than the 1 MiB one request may hold; send fewer instances at once" in endless.json()["detail"]
    )
    assert list(store.tmp_dir.iterdir()) == []
    with Session(engine) as session:
        assert len(session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()) == 2


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


def test_a_deflated_clip_shows_in_a_viewer_frame_by_frame(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """Older carts send Deflated Explicit VR Little Endian (our SCP now takes it, kept as sent): its frames,
    which a viewer fetches to show the clip, were a 406 "retrieve the whole instance instead"."""
    case_id = open_case(engine, settings)
    study = new_study()
    clip = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=4))
    )
    clip.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    headers = operations_headers(settings)
    client = DICOMwebClient(url=f"{base_url}/dicomweb/cases/{case_id}", headers=headers)
    client.store_instances([clip])
    series, sop = clip.SeriesInstanceUID, clip.SOPInstanceUID
    size = len(clip.PixelData) // 4
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1, 4])
    assert frames == [clip.PixelData[:size], clip.PixelData[3 * size :]]
    whole = client.retrieve_instance(study, series, sop)
    assert whole.PixelData == clip.PixelData


def test_qido_matches_series_and_instance_numbers_and_modality(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """PS3.18 Table 10.6.1-5/-6: SeriesNumber and Modality match at series level (and in a query of a study's
    instances), InstanceNumber at instance level; a value of the wrong type is a 400 that says so."""
    case_id = open_case(engine, settings)
    study = new_study()
    first, second, other = instances(study)
    second.InstanceNumber = 2
    other.SeriesInstanceUID, other.SeriesNumber, other.Modality = study + ".2", 2, "OT"
    client = DICOMwebClient(url=f"{base_url}/dicomweb/cases/{case_id}", headers=operations_headers(settings))
    client.store_instances([first, second, other])

    def sops(found: list[dict[str, Any]]) -> list[str]:
        return sorted(i["00080018"]["Value"][0] for i in found)

    [series] = client.search_for_series(study, search_filters={"SeriesNumber": 2})
    assert series["0020000E"]["Value"] == [study + ".2"]
    [series] = client.search_for_series(study, search_filters={"Modality": "US"})
    assert series["0020000E"]["Value"] == [study + ".1"]
    assert client.search_for_series(study, search_filters={"SeriesNumber": 3}) == []
    assert len(client.search_for_series(study, search_filters={"SeriesNumber": "1,2"})) == 2
    assert sops(client.search_for_instances(study, search_filters={"InstanceNumber": 2})) == [
        second.SOPInstanceUID
    ]
    assert sops(client.search_for_instances(study, search_filters={"SeriesNumber": 2})) == [
        other.SOPInstanceUID
    ]
    assert sops(client.search_for_instances(study, search_filters={"Modality": "OT"})) == [
        other.SOPInstanceUID
    ]
    in_series = client.search_for_instances(study, study + ".1", search_filters={"InstanceNumber": 1})
    assert sops(in_series) == [first.SOPInstanceUID] and in_series[0]["00200011"]["Value"] == [1]

    root = f"{base_url}/dicomweb/cases/{case_id}/studies/{study}"
    for query in ("series?SeriesNumber=abc", "instances?InstanceNumber=1.5", "instances?SeriesNumber=1,x"):
        refused = requests.get(f"{root}/{query}", headers=operations_headers(settings), timeout=10)
        assert refused.status_code == 400, query
        assert "Integer String (IS)" in refused.json()["detail"]


def test_a_stow_into_a_cancelled_case_is_409_with_every_instance_failed(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    cancelled = CaseCancelled(case_id=case_id, reason="withdrawn", cancelled_by="ops")
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=cancelled, subject=case_id), settings
        )
        session.commit()
    sent = instances(new_study())[:2]
    answer = stow(
        f"{base_url}/dicomweb/cases/{case_id}/studies",
        settings,
        *(("application/dicom", encoded(d)) for d in sent),
    )
    assert answer.status_code == 409
    failed = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert [(f.ReferencedSOPInstanceUID, f.FailureReason) for f in failed] == [
        (d.SOPInstanceUID, 0x0110) for d in sent
    ]
    assert "this case was cancelled" in answer.headers["warning"]


def test_qido_warns_of_query_keys_and_fuzzy_matching_it_does_not_honour(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """PS3.18 8.3.4.2: fuzzymatching=true is answered with literal matching and a 299 Warning saying so; a
    matching key a resource does not match on (PatientName, by keyword or by tag) is ignored with a 299 Warning
    naming it, never its value. Both were ignored silently: the unfiltered list looked like a match."""
    case_id = open_case(engine, settings)
    study = new_study()
    root = f"{base_url}/dicomweb/cases/{case_id}"
    headers = operations_headers(settings)
    DICOMwebClient(url=root, headers=headers).store_instances(instances(study)[:1])

    fuzzy = requests.get(
        f"{root}/studies",
        params={"PatientName": "Smith^Jo*", "fuzzymatching": "true"},
        headers=headers,
        timeout=10,
    )
    assert fuzzy.status_code == 200 and len(fuzzy.json()) == 1
    warning = fuzzy.headers["Warning"]
    assert (
        f'299 {root} "The fuzzymatching parameter is not supported. Only literal matching has been performed."'
        in warning
    )
    assert "not supported as query keys" in warning and "PatientName" in warning and "Smith" not in warning

    by_tag = requests.get(
        f"{root}/studies/{study}/series", params={"0008103E": "Doppler"}, headers=headers, timeout=10
    )
    assert by_tag.status_code == 200 and "SeriesDescription" in by_tag.headers["Warning"]
    honoured = requests.get(
        f"{root}/studies",
        params={"PatientID": f"SO-{case_id}", "fuzzymatching": "false", "PatientName": "", "limit": 5},
        headers=headers,
        timeout=10,
    )
    assert honoured.status_code == 200 and "Warning" not in honoured.headers
    bad = requests.get(f"{root}/studies", params={"fuzzymatching": "yes"}, headers=headers, timeout=10)
    assert bad.status_code == 400 and "true or false" in bad.json()["detail"]


def test_a_keys_reads_of_one_instance_are_one_audit_entry_per_window(
    base_url: str, engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer reads a cine frame by frame: each frame wrote its own audit entry, naming no image (300 rows
    for one look at a 300-frame clip). Now the first read of an instance by a key writes one entry naming the
    study, series and instance; that key's further reads of it within the window write none, another key's
    read writes its own, a read after the window a new one. Each entry is chained (its hash holds)."""
    clock = [1000.0]
    windows = ReadWindows(600, clock=lambda: clock[0])
    monkeypatch.setattr(access, "get_read_windows", lambda: windows)
    case_id = open_case(engine, settings)
    study = new_study()
    clip = instances(study)[2]
    root = f"{base_url}/dicomweb/cases/{case_id}"
    operations = operations_headers(settings)
    DICOMwebClient(url=root, headers=operations).store_instances([clip])
    specialist = "spec-audit-window"
    tenancy.settle_reviewer(
        get_engine("auth"),
        case_id,
        specialist,
        lambda: tenancy.ReviewerStanding(True, "offered"),
        service="review",
    )
    instance = f"{root}/studies/{study}/series/{clip.SeriesInstanceUID}/instances/{clip.SOPInstanceUID}"
    frames = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}

    def read_cine(headers: dict[str, str]) -> None:
        for n in range(1, 5):
            assert requests.get(f"{instance}/frames/{n}", headers={**frames, **headers}, timeout=10).ok
        assert requests.get(f"{instance}/metadata", headers=headers, timeout=10).ok

    def entries() -> list[Any]:
        return [
            e
            for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
            if clip.SOPInstanceUID in e.detail
        ]

    read_cine(operations)
    [first] = entries()
    assert first.action == "read" and first.outcome == "success" and first.resource == "records.dicomweb"
    assert first.detail.startswith(
        f"study {study} series {clip.SeriesInstanceUID} instance {clip.SOPInstanceUID}"
    )
    read_cine(specialist_headers(settings, specialist))
    read_cine(operations)
    assert [e.actor for e in entries()] == [first.actor, entries()[1].actor]
    assert entries()[1].actor != first.actor
    clock[0] += 601
    read_cine(operations)
    logged = entries()
    assert [e.actor for e in logged] == [first.actor, logged[1].actor, first.actor]
    assert all(e.row_hash == entry_hash(e) for e in logged)


def test_reads_of_one_instance_served_by_two_replicas_are_one_audit_entry(
    base_url: str, engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a load balancer a viewer's frames go to every replica in turn. Each replica kept its own windows,
    so each wrote an entry for one look at one clip; the window is now shared through the database (one row
    per key, instance and window, inserted with the entry): one entry, whichever replica served which frame."""
    replicas = [ReadWindows(600), ReadWindows(600)]
    served = itertools.cycle(replicas)
    monkeypatch.setattr(access, "get_read_windows", lambda: next(served))
    case_id = open_case(engine, settings)
    study = new_study()
    clip = instances(study)[2]
    root = f"{base_url}/dicomweb/cases/{case_id}"
    headers = operations_headers(settings)
    DICOMwebClient(url=root, headers=headers).store_instances([clip])
    instance = f"{root}/studies/{study}/series/{clip.SeriesInstanceUID}/instances/{clip.SOPInstanceUID}"
    frames = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    for n in [1, 2, 3, 4, 1, 2]:
        assert requests.get(f"{instance}/frames/{n}", headers={**frames, **headers}, timeout=10).ok
    logged = [
        e
        for e in audit.entries(get_engine("auth"), case_id=case_id, limit=10_000)
        if clip.SOPInstanceUID in e.detail
    ]
    assert len(logged) == 1 and logged[0].row_hash == entry_hash(logged[0])


def test_head_answers_dicomweb_reads_with_the_headers_of_the_get_and_no_body(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    """RFC 9110 9.3.2: viewers and proxies check a resource with HEAD; every DICOMweb read was a 405. A HEAD
    hands out no content, so it writes no audit entry; one without a key is refused (and audited) as a GET."""
    case_id = open_case(engine, settings)
    study = new_study()
    clip = instances(study)[2]
    root = f"{base_url}/dicomweb/cases/{case_id}"
    headers = operations_headers(settings)
    DICOMwebClient(url=root, headers=headers).store_instances([clip])
    instance = f"{root}/studies/{study}/series/{clip.SeriesInstanceUID}/instances/{clip.SOPInstanceUID}"
    frames = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    logged = audit.count(get_engine("auth"), case_id=case_id)
    for url, accept in [
        (f"{root}/studies", {}),
        (f"{instance}/metadata", {}),
        (f"{instance}/frames/2", frames),
        (instance, {"Accept": "application/dicom"}),
        (f"{root}/studies/{study}", {}),
    ]:
        got = requests.get(url, headers={**headers, **accept}, timeout=10)
        head = requests.head(url, headers={**headers, **accept}, timeout=10)
        assert (head.status_code, head.content) == (200, b""), url
        assert head.headers["Content-Type"].split(";")[0] == got.headers["Content-Type"].split(";")[0], url
        if "json" in got.headers["Content-Type"]:
            assert head.headers["Content-Length"] == got.headers["Content-Length"]
    # The GETs' alone: the search, the study, and one for the instance's metadata, frames and whole.
    assert audit.count(get_engine("auth"), case_id=case_id) == logged + 3
    assert requests.head(f"{instance}/frames/9", headers={**headers, **frames}, timeout=10).status_code == 404
    assert requests.head(f"{instance}/frames/1", headers=frames, timeout=10).status_code == 401
