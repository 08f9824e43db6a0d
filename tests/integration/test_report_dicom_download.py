"""The report's DICOM instance downloaded from the review service is the records service's copy: the same SOP
Instance UID with the same patient and study identity (the study's, as records placed it), never the copy with
intake's identity; and nothing while records has not placed it. A radiologist who imports both into a PACS
(or gets one sent back and downloads the other) gets one instance, filed once.

Both services run for real: review's API in process, records' behind uvicorn, on the test database."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CollectRecords, new_event
from contracts.commands import MatchSpecialist, ReconcileIdentity
from services.auth.partners import create_partner
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.common.http import create_app
from services.records import consumer as records_consumer
from services.review import api, deps
from tests.infra import free_port
from tests.integration import test_review_flow as flow
from tests.integration.test_records_dicomweb import new_study, serving
from tests.integration.test_records_second_opinion import IMAGE_STUDY, store_images
from tests.keys import operations_headers, specialist_headers
from tests.unit.test_review_matching import request as match_request

# The review fixtures (its database, tables emptied before each test so the specialist has room).
engine, empty_tables = flow.engine, flow.empty_tables

# What a PACS files an instance by (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study) and the instance itself.
IDENTITY = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
)


@pytest.fixture(scope="module")
def records_engine(settings: Settings) -> Engine:
    records = make_engine("records", settings)
    migrate.upgrade("records", records)
    return records


@pytest.fixture(scope="module")
def records_url(records_engine: Engine, settings: Settings) -> Iterator[str]:
    with serving(records_engine, settings) as url:
        yield url


def review_client(engine: Engine, settings: Settings, records_url: str) -> TestClient:
    app = create_app("review", routers=[api.router], engine=lambda: engine)
    app.dependency_overrides[deps.review_engine] = lambda: engine
    served = settings.model_copy(update={"records_url": records_url})
    app.dependency_overrides[get_settings] = lambda: served
    return TestClient(app, headers=operations_headers(settings))


@pytest.fixture
def review(engine: Engine, settings: Settings, records_url: str) -> Iterator[TestClient]:
    with review_client(engine, settings, records_url) as client:
        yield client


def reviewed_case(
    engine: Engine, records_engine: Engine, settings: Settings, review: TestClient, **match: Any
) -> tuple[str, str, str]:
    """A case whose records were requested and whose review was submitted: (case id, study, review id)."""
    study = new_study()
    base = match_request("pelvic", "CA")
    command, assigned = flow.assigned_review(
        engine,
        settings,
        patient=base.patient.model_copy(update={"mrn": "MRN1"}),  # the facility's patient id, on the images
        study=base.study.model_copy(update={"study_instance_uid": study}),
        **match,
    )
    case_id = command.subject
    assert case_id is not None
    matched = MatchSpecialist.model_validate(command.data)
    collect = CollectRecords(
        case_id=case_id,
        patient=matched.patient,
        exam=matched.exam.model_copy(update={"study_instance_uid": study}),
        partner_id=matched.partner_id,
    )
    records_apply(records_engine, settings, collect)
    findings = review.post(
        f"/v1/reviews/{assigned['review_id']}", json=flow.FINDINGS, headers=specialist_headers(settings)
    )
    assert findings.status_code == 200, findings.text
    return case_id, study, assigned["review_id"]


def compose(engine: Engine, settings: Settings, case_id: str, review_id: str) -> None:
    flow.apply(engine, settings, flow.compose_command(case_id, review_id))


def records_apply(records_engine: Engine, settings: Settings, message: Any) -> None:
    with Session(records_engine) as session:
        records_consumer.handle(
            session,
            new_event(id=str(uuid.uuid4()), source="/t", data=message, subject=message.case_id),
            settings,
        )
        session.commit()


def deliver_report(engine: Engine, records_engine: Engine, settings: Settings, case_id: str) -> None:
    """The review service's document.encapsulated_report, as the broker hands it to records."""
    event = flow.outbox_event(engine, f"document.encapsulated_report:{case_id}:1")
    with Session(records_engine) as session:
        records_consumer.handle(session, event, settings)
        session.commit()


def from_review(review: TestClient, case_id: str, **headers: str) -> httpx.Response:
    return review.get(f"/v1/reports/{case_id}", headers={"Accept": "application/dicom", **headers})


def from_records(records_url: str, settings: Settings, case_id: str) -> bytes:
    """The report instance as records hands it out: listed with the case's files, then downloaded."""
    headers = operations_headers(settings)
    listed = httpx.get(f"{records_url}/v1/records/{case_id}", headers=headers, timeout=10).json()
    [report] = [f for f in listed["files"] if f.get("modality") == "DOC"]
    response = httpx.get(
        f"{records_url}/v1/records/{case_id}/files/{report['sha256']}", headers=headers, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.content


def identity(dataset: pydicom.Dataset) -> dict[str, str]:
    return {keyword: str(dataset.get(keyword, "")) for keyword in IDENTITY}


def test_the_download_from_review_is_records_copy_placed_in_the_study(
    engine: Engine, records_engine: Engine, settings: Settings, review: TestClient, records_url: str
) -> None:
    case_id, study, review_id = reviewed_case(engine, records_engine, settings, review)
    store_images(records_engine, settings, case_id, study, birth_date="19800101")
    compose(engine, settings, case_id, review_id)
    deliver_report(engine, records_engine, settings, case_id)

    downloaded = from_review(review, case_id)

    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.headers["content-type"] == "application/dicom"
    assert 'filename="second-opinion-' in downloaded.headers["content-disposition"]
    reviewed = pydicom.dcmread(io.BytesIO(downloaded.content))
    recorded = from_records(records_url, settings, case_id)
    assert identity(reviewed) == identity(pydicom.dcmread(io.BytesIO(recorded)))
    assert downloaded.content == recorded  # not a look-alike: the very bytes records hands out
    # The study's identity as the facility's images carry it, not intake's (Doe^Jane, 2025-03-01).
    assert (str(reviewed.PatientName), reviewed.StudyInstanceUID) == ("DOE^JANE^MARIE", study)
    for keyword in ("StudyDate", "StudyID", "ReferringPhysicianName"):
        assert str(reviewed[keyword].value) == IMAGE_STUDY[keyword], keyword
    assert reviewed.IssuerOfPatientID == "SECONDOPINION"  # our identifiers, as records hands out the images
    # We wrote it: its file meta names our implementation, not pydicom's (the conformance statement's 10).
    meta = reviewed.file_meta
    assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
    )
    pdf = bytes(reviewed.EncapsulatedDocument)[: reviewed.EncapsulatedDocumentLength]
    assert pdf == review.get(f"/v1/reports/{case_id}", headers={"Accept": "application/pdf"}).content
    location = downloaded.headers["content-location"]
    assert location.endswith(
        f"/studies/{study}/series/{reviewed.SeriesInstanceUID}/instances/{reviewed.SOPInstanceUID}"
    )


def test_nothing_is_served_while_the_images_wait_for_an_identity_decision(
    engine: Engine, records_engine: Engine, settings: Settings, review: TestClient, records_url: str
) -> None:
    # The images came with another birth date: held for a person. The report cannot take their identity yet,
    # and intake's must not go out under a UID that will carry theirs.
    case_id, study, review_id = reviewed_case(engine, records_engine, settings, review)
    store_images(records_engine, settings, case_id, study, birth_date="19790101")
    compose(engine, settings, case_id, review_id)

    not_stored = from_review(review, case_id)
    deliver_report(engine, records_engine, settings, case_id)
    held = from_review(review, case_id)

    for waiting in (not_stored, held):
        assert waiting.status_code == 409, waiting.text
        assert int(waiting.headers["Retry-After"]) > 0
        assert waiting.headers["content-type"] == "application/problem+json"
        assert "application/pdf" in waiting.json()["detail"]  # what the caller can have meanwhile
        assert "Doe" not in waiting.text and "1980" not in waiting.text
    assert "not stored" in not_stored.json()["detail"]
    assert "identity decision" in held.json()["detail"]
    listed = httpx.get(
        f"{records_url}/v1/records/{case_id}", headers=operations_headers(settings), timeout=10
    ).json()
    assert [f for f in listed["files"] if f.get("modality") == "DOC"] == []  # records hands none out either

    [images] = [i for i in listed["imports"] if i["status"] == "identity_mismatch"]
    decision = ReconcileIdentity(
        case_id=case_id,
        import_id=images["import_id"],
        decision="accept",
        decided_by="nurse-12",
        reason="same",
    )
    records_apply(records_engine, settings, decision)

    downloaded = from_review(review, case_id)
    assert downloaded.status_code == 200, downloaded.text
    reviewed = pydicom.dcmread(io.BytesIO(downloaded.content))
    recorded = from_records(records_url, settings, case_id)
    assert identity(reviewed) == identity(pydicom.dcmread(io.BytesIO(recorded)))
    assert downloaded.content == recorded
    assert (reviewed.PatientBirthDate, reviewed.StudyInstanceUID) == ("19790101", study)  # the images' now


def test_the_download_stays_with_the_reports_readers(
    engine: Engine, records_engine: Engine, settings: Settings, review: TestClient
) -> None:
    with Session(make_engine("auth", settings)) as session:
        owner, other = (create_partner(session, f"Clinic {uuid.uuid4().hex[:6]}") for _ in range(2))
        session.commit()
    case_id, study, review_id = reviewed_case(
        engine, records_engine, settings, review, partner_id=owner.partner_id
    )
    store_images(records_engine, settings, case_id, study, birth_date="19800101")
    compose(engine, settings, case_id, review_id)
    deliver_report(engine, records_engine, settings, case_id)

    by_owner = from_review(review, case_id, Authorization=f"Bearer {owner.api_key}")
    by_other = from_review(review, case_id, Authorization=f"Bearer {other.api_key}")
    by_writer = from_review(review, case_id, **specialist_headers(settings))
    by_another_specialist = from_review(review, case_id, **specialist_headers(settings, "spec-gyn-2"))

    assert by_owner.status_code == 200, by_owner.text  # records checked the partner's own key as well
    assert by_writer.status_code == 200, by_writer.text
    assert (by_other.status_code, by_another_specialist.status_code) == (404, 404)
    assert by_owner.content == by_writer.content


def test_records_down_is_a_503_to_retry_not_another_copy(
    engine: Engine, records_engine: Engine, settings: Settings, review: TestClient
) -> None:
    case_id, study, review_id = reviewed_case(engine, records_engine, settings, review)
    store_images(records_engine, settings, case_id, study, birth_date="19800101")
    compose(engine, settings, case_id, review_id)
    deliver_report(engine, records_engine, settings, case_id)

    with review_client(engine, settings, f"http://127.0.0.1:{free_port()}") as cut_off:
        downloaded = from_review(cut_off, case_id)

    assert downloaded.status_code == 503
    assert int(downloaded.headers["Retry-After"]) > 0
    assert "did not answer" in downloaded.json()["detail"]
