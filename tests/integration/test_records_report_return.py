"""The second opinion goes back into the facility's PACS: a real Orthanc (the partner's PACS) receives each
version of the report, the review service's DICOM Encapsulated PDF, by C-STORE or by STOW-RS, in the study it
reads, when the partner's source asks for it. What its radiologists would check: the report is in their PACS,
in the right study, the same PDF; a PACS that is down gets it later; a refusal is shown, not lost."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import new_event
from contracts.commands import ReconcileIdentity
from contracts.events import CaseCancelled, EncapsulatedReport
from services.common.amqp import Consumer, HandlerCommitted
from services.common.config import Settings
from services.common.db import Inbox
from services.common.errors import PoisonMessage
from services.records import consumer, uploads
from services.records.archive import Entry
from services.records.models import RecordFile, RecordRequest, ReportReturn
from services.records.reconcile import our_identifiers as our_ids
from services.records.report_return import ReturnSettings, plan_return, run_due
from services.records.report_study import REPORT_SOURCE
from services.records.store import ObjectStore
from services.review.encapsulated_pdf import encapsulated_pdf
from tests.dicom_factory import make_pdf_report, make_us_instance
from tests.infra import free_port
from tests.integration import test_records_retrieval as retrieval
from tests.integration.test_records_second_opinion import store_images
from tests.orthanc import PASSWORD, USER, Orthanc, running_orthanc
from tests.unit.test_review_matching import request as match_request

engine, client = retrieval.engine, retrieval.client  # the records service and its API, as fixtures
OPTIONS = ReturnSettings(attempts=2, backoff_seconds=0, timeout_seconds=5, held_recheck_seconds=0)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), scp_port=free_port()) as orthanc:
        yield orthanc


def returning_case(
    client: TestClient, engine: Engine, settings: Settings, partner: str, study: str, **source: object
) -> str:
    """A case of `partner` reading `study`, whose image source (`source`) asks for reports back."""
    retrieval.configure(client, partner, **source, return_reports=True)
    return retrieval.open_case(engine, settings, partner, study_instance_uid=study)


def held_import(client: TestClient, case_id: str) -> str:
    """The id of the case's one import held for its identity."""
    imports = client.get(f"/v1/records/{case_id}").json()["imports"]
    [held] = [i["import_id"] for i in imports if i["status"] == "identity_mismatch"]
    return str(held)


def accept_held(engine: Engine, settings: Settings, case_id: str, import_id: str) -> None:
    """A person accepts the import held for its identity (IHE IRWF), through the records consumer."""
    decision = ReconcileIdentity(
        case_id=case_id, import_id=import_id, decision="accept", decided_by="nurse-12", reason="same patient"
    )
    with Session(engine) as session:
        event = new_event(id=str(uuid.uuid4()), source="/t", data=decision, subject=case_id)
        consumer.handle(session, event, settings)
        session.commit()


def report_for(
    case_id: str, study_uid: str, version: int = 1, mrn: str = "MRN1"
) -> tuple[EncapsulatedReport, bytes]:
    """The review service's report instance for the case's patient (Doe^Jane, MRN1) and study."""
    case = match_request("pelvic", "CA")
    case = case.model_copy(
        update={
            "case_id": case_id,
            "patient": case.patient.model_copy(update={"mrn": mrn}),
            "study": case.study.model_copy(update={"study_instance_uid": study_uid}) if case.study else None,
        }
    )
    pdf = make_pdf_report(f"Second opinion, version {version}")
    dicom = encapsulated_pdf(
        pdf=pdf, request=case, report_id=f"rep-{case_id}", version=version, issued=datetime.now(UTC)
    )
    ds = pydicom.dcmread(io.BytesIO(dicom))
    if ds.StudyInstanceUID != study_uid:  # a case without study details: the report opens its own study
        ds.StudyInstanceUID = study_uid
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        dicom = buffer.getvalue()
    event = EncapsulatedReport(
        case_id=case_id,
        report_id=f"rep-{case_id}",
        version=version,
        sop_instance_uid=str(ds.SOPInstanceUID),
        dicom_base64=base64.b64encode(dicom).decode(),
    )
    return event, pdf


def deliver(engine: Engine, settings: Settings, event: EncapsulatedReport) -> None:
    with Session(engine) as session:
        consumer.handle(
            session,
            new_event(id=str(uuid.uuid4()), source="/review", data=event, subject=event.case_id),
            settings,
        )
        session.commit()


def in_pacs(pacs: Orthanc, study_uid: str) -> list[dict[str, object]]:
    response = httpx.get(
        f"{pacs.dicomweb_url}/studies/{study_uid}/instances",
        auth=pacs.auth,
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    )
    return [] if response.status_code == 204 else list(response.json())


def one_instance(pacs: Orthanc, **query: str) -> str:
    """The Orthanc id of the one instance matching `query` (DICOM keywords)."""
    [found] = httpx.post(
        f"{pacs.url}/tools/find", json={"Level": "Instance", "Query": query}, auth=pacs.auth, timeout=10
    ).json()
    return str(found)


def pdf_in_pacs(pacs: Orthanc, study_uid: str, sop_uid: str) -> bytes:
    found = one_instance(pacs, SOPInstanceUID=sop_uid, StudyInstanceUID=study_uid)
    response = httpx.get(f"{pacs.url}/instances/{found}/pdf", auth=pacs.auth, timeout=10)
    response.raise_for_status()
    return response.content


@pytest.mark.parametrize("how", ["c-store", "stow-rs"])
def test_each_report_version_lands_in_the_facilitys_pacs_in_the_study_it_reads(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pacs: Orthanc,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    partner = f"clinic-return-{how}"
    if how == "c-store":
        source: dict[str, object] = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
    else:
        monkeypatch.setenv("FACILITY_PACS_AUTH", f"{USER}:{PASSWORD}")
        source = {"dicomweb_url": pacs.dicomweb_url, "dicomweb_auth_env": "FACILITY_PACS_AUTH"}
    retrieval.configure(client, partner, **source, return_reports=True)
    assert client.get(f"/v1/records/sources/{partner}").json()["return_reports"] is True
    study = f"1.2.826.0.1.3680043.10.7100.{len(how)}"
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=study)

    first, first_pdf = report_for(case_id, study)
    deliver(engine, settings, first)
    deliver(engine, settings, first)  # redelivered: sent once
    assert run_due(engine, settings, OPTIONS) == 1
    assert pdf_in_pacs(pacs, study, first.sop_instance_uid) == first_pdf
    # An addendum's version is a new instance in the same study; the first stays.
    addended, addended_pdf = report_for(case_id, study, version=2)
    deliver(engine, settings, addended)
    assert run_due(engine, settings, OPTIONS) == 1
    assert pdf_in_pacs(pacs, study, addended.sop_instance_uid) == addended_pdf
    classes = {str(i["00080016"]["Value"][0]) for i in in_pacs(pacs, study)}  # type: ignore[index]
    assert classes == {"1.2.840.10008.5.1.4.1.1.104.1"}  # Encapsulated PDF Storage, and nothing else
    returns = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert [(r["version"], r["status"], r["attempts"]) for r in returns] == [(1, "done", 1), (2, "done", 1)]
    assert run_due(engine, settings, OPTIONS) == 0


def test_a_partner_that_did_not_ask_gets_nothing_back(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    retrieval.configure(
        client, "clinic-no-return", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port
    )
    study = "1.2.826.0.1.3680043.10.7100.9"
    case_id = retrieval.open_case(engine, settings, "clinic-no-return", study_instance_uid=study)
    deliver(engine, settings, report_for(case_id, study)[0])
    assert client.get(f"/v1/records/{case_id}").json()["report_returns"] == []
    assert run_due(engine, settings, OPTIONS) == 0
    assert in_pacs(pacs, study) == []


def test_a_pacs_that_is_down_is_retried_then_the_failure_is_shown(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    down = free_port()  # nothing listens there
    study = "1.2.826.0.1.3680043.10.7100.10"
    case_id = returning_case(
        client, engine, settings, "clinic-down", study, ae_title="DOWNPACS", host="127.0.0.1", port=down
    )
    deliver(engine, settings, report_for(case_id, study)[0])
    assert run_due(engine, settings, OPTIONS) == 1
    [waiting] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (waiting["status"], waiting["attempts"]) == ("pending", 1)
    assert "DOWNPACS" in waiting["last_error"]
    # The PACS comes back under the same AE at the partner's next configuration: the retry gets it there.
    retrieval.configure(
        client,
        "clinic-down",
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
        return_reports=True,
    )
    assert run_due(engine, settings, OPTIONS) == 1
    [sent] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (sent["status"], sent["attempts"]) == ("done", 2)
    assert len(in_pacs(pacs, study)) == 1


def test_a_pacs_down_for_every_attempt_fails_the_return_with_why(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    study = "1.2.826.0.1.3680043.10.7100.11"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-gone",
        study,
        ae_title="GONEPACS",
        host="127.0.0.1",
        port=free_port(),
    )
    deliver(engine, settings, report_for(case_id, study)[0])
    assert run_due(engine, settings, OPTIONS) == 1
    assert run_due(engine, settings, OPTIONS) == 1
    [failed] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    assert "GONEPACS" in failed["last_error"] and "Doe" not in failed["last_error"]
    with Session(engine) as session:
        assert session.exec(select(ReportReturn).where(ReportReturn.case_id == case_id)).one().finished_at


def test_a_report_held_for_its_identity_goes_back_once_a_person_accepts_it(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    study = "1.2.826.0.1.3680043.10.7100.12"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-held",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    deliver(engine, settings, report_for(case_id, study, version=1, mrn="MRN-OTHER")[0])  # not the case's MRN
    held = held_import(client, case_id)
    assert client.get(f"/v1/records/{case_id}").json()["report_returns"] == []  # not sent while held
    assert run_due(engine, settings, OPTIONS) == 0

    accept_held(engine, settings, case_id, held)
    assert run_due(engine, settings, OPTIONS) == 1
    [sent] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (sent["status"], sent["version"]) == ("done", 1)
    assert len(in_pacs(pacs, study)) == 1


def test_a_report_in_a_batch_with_a_failing_message_is_applied_once_the_batch_is_taken_apart(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    # The consumer applies a round of deliveries in one transaction, with their inbox rows; if one fails it
    # applies them one by one. The report's import committed that transaction half-way, so the messages
    # looked applied already: the report's return to the PACS and the failing message itself were lost.
    study = "1.2.826.0.1.3680043.10.7100.13"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-batch",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    report = new_event(
        id=str(uuid.uuid4()), source="/review", data=report_for(case_id, study)[0], subject=case_id
    )
    wrong = ReconcileIdentity(
        case_id=case_id, import_id="no-such-import", decision="accept", decided_by="x", reason="y"
    )
    failing = new_event(id=str(uuid.uuid4()), source="/t", data=wrong, subject=case_id)
    records = Consumer(settings=settings, queue="records", engine=engine, handle=consumer.handle)

    with pytest.raises(PoisonMessage):
        records.apply_batch([report, failing])
    assert client.get(f"/v1/records/{case_id}").json()["report_returns"] == []  # nothing of the batch kept
    assert records.apply(report) is True  # applied now, not taken for a duplicate
    with pytest.raises(PoisonMessage):
        records.apply(failing)  # still fails on its own (and is dead-lettered, not acked as applied)
    assert len(client.get(f"/v1/records/{case_id}").json()["report_returns"]) == 1
    with Session(engine) as session:
        assert session.get(Inbox, failing.id) is None
    assert run_due(engine, settings, OPTIONS) == 1 and len(in_pacs(pacs, study)) == 1


def test_a_handler_may_not_commit_the_consumers_transaction(engine: Engine, settings: Settings) -> None:
    def committing(session: Session, event: object) -> None:
        session.commit()

    guarded = Consumer(settings=settings, queue="records", engine=engine, handle=committing)
    message = new_event(
        id=str(uuid.uuid4()),
        source="/t",
        data=ReconcileIdentity(case_id="c", import_id="i", decision="accept", decided_by="x", reason="y"),
        subject="c",
    )
    with pytest.raises(HandlerCommitted):
        guarded.apply(message)
    with Session(engine) as session:
        assert session.get(Inbox, message.id) is None  # nothing kept: the message is retried


def test_an_unexpected_error_in_a_send_is_counted_and_ends_in_failed_not_a_loop(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    # The stored instance no longer reads as DICOM (a disk fault): neither a PACS outage nor a refusal.
    study = "1.2.826.0.1.3680043.10.7100.14"
    case_id = returning_case(
        client, engine, settings, "clinic-odd", study, ae_title="ODDPACS", host="127.0.0.1", port=free_port()
    )
    deliver(engine, settings, report_for(case_id, study)[0])
    with Session(engine) as session:
        stored = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).one()
    path = ObjectStore.for_settings(settings).local_path(stored.storage_path, stored.sha256)
    path.chmod(0o644)
    path.write_bytes(b"not DICOM any more")
    assert run_due(engine, settings, OPTIONS) == 1
    assert run_due(engine, settings, OPTIONS) == 1
    [failed] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    assert "failed unexpectedly" in failed["last_error"]
    assert run_due(engine, settings, OPTIONS) == 0


def test_a_report_waits_for_images_held_for_identity_then_goes_with_their_identity(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    # The images came with another birth date and wait for a person's decision; the report (intake's identity)
    # must not be filed in the facility's PACS under an identity the study does not have.
    study = "1.2.826.0.1.3680043.10.7100.15"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-held-images",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    store_images(engine, settings, case_id, study, birth_date="19790101")
    event = report_for(case_id, study)[0]
    deliver(engine, settings, event)

    assert run_due(engine, settings, OPTIONS) == 0  # postponed, no attempt counted
    [waiting] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (waiting["status"], waiting["attempts"]) == ("pending", 0)
    assert "identity decision" in waiting["last_error"]  # why it waits, for operations
    # Not handed out either: it has no identity to show until the images have theirs.
    unplaced = client.get(f"/v1/records/{case_id}/second-opinion/{event.sop_instance_uid}")
    assert (unplaced.status_code, "identity decision" in unplaced.json()["detail"]) == (409, True)
    assert int(unplaced.headers["Retry-After"]) > 0
    held = held_import(client, case_id)
    accept_held(engine, settings, case_id, held)

    assert run_due(engine, settings, OPTIONS) == 1
    found = one_instance(pacs, StudyInstanceUID=study, Modality="DOC")
    tags = httpx.get(f"{pacs.url}/instances/{found}/simplified-tags", auth=pacs.auth, timeout=10).json()
    [sent] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert sent["sop_instance_uid"] == tags["SOPInstanceUID"]  # the instance the PACS holds
    assert (tags["StudyDate"], tags["AccessionNumber"], tags["PatientBirthDate"]) == (
        "20261118",
        "RIS0042",
        "19790101",
    )
    # The copy records hands out is that instance with that identity (our identifiers coerced on the way
    # out, the facility's kept as the originals), not a second one: one UID, one identity, in any PACS.
    [stored] = [f for f in client.get(f"/v1/records/{case_id}").json()["files"] if f["modality"] == "DOC"]
    handed_out = pydicom.dcmread(
        io.BytesIO(client.get(f"/v1/records/{case_id}/files/{stored['sha256']}").content)
    )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "PatientName", "PatientBirthDate", "StudyDate"):
        assert str(handed_out[keyword].value) == tags[keyword], keyword
    [originals] = handed_out.OriginalAttributesSequence[-1].ModifiedAttributesSequence
    assert (originals.PatientID, originals.AccessionNumber) == (tags["PatientID"], tags["AccessionNumber"])


def test_a_cancelled_case_sends_no_report_still_waiting(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    study = "1.2.826.0.1.3680043.10.7100.16"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-cancel",
        study,
        ae_title="DOWNPACS",
        host="127.0.0.1",
        port=free_port(),
    )
    deliver(engine, settings, report_for(case_id, study)[0])
    assert run_due(engine, settings, OPTIONS) == 1  # the PACS is down: it waits for a retry

    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="ops")
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/wf", data=cancelled, subject=case_id), settings
        )
        session.commit()

    [gone] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (gone["status"], gone["last_error"]) == ("cancelled", "the case was cancelled")
    assert run_due(engine, settings, OPTIONS) == 0


def facility_image(study: str) -> bytes:
    """An image as the facility's PACS holds it: its Patient ID and Accession Number with their issuers."""
    dataset = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    dataset.IssuerOfPatientID = "BAYVIEW"
    dataset.IssuerOfPatientIDQualifiersSequence = [pydicom.Dataset()]
    dataset.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = "1.2.826.0.1.3680043.10.7777"
    dataset.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityIDType = "ISO"
    dataset.AccessionNumber = "RIS0042"
    dataset.IssuerOfAccessionNumberSequence = [pydicom.Dataset()]
    dataset.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "BAYVIEW-RIS"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


IDENTIFIERS = (
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
)


def identifiers(dataset: pydicom.Dataset) -> dict[str, object]:
    return {k: dataset[k].to_json_dict(None, 0) if k in dataset else None for k in IDENTIFIERS}


def test_the_report_goes_back_with_the_facilitys_identifiers_and_is_handed_out_with_ours(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    """IHE IRWF, each copy in its domain. The facility's PACS files the report by the facility's Patient ID
    and Accession Number with their issuers, as on its images: the issuers' details were dropped from the copy
    sent back. Handed out by records, report and images carry our identifiers, the facility's kept as the
    originals: the facility's issuer details stayed on the images, so our Patient ID read as theirs."""
    study = "1.2.826.0.1.3680043.10.7100.17"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-irwf",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    image = facility_image(study)
    with Session(engine, expire_on_commit=False) as session:
        uploaded = uploads.accept_upload(
            case_id, [uploads.IncomingFile(io.BytesIO(image), "application/dicom")], session, settings
        )
    event = report_for(case_id, study)[0]
    deliver(engine, settings, event)
    assert run_due(engine, settings, OPTIONS) == 1

    found = one_instance(pacs, StudyInstanceUID=study, Modality="DOC")
    in_facility = pydicom.dcmread(
        io.BytesIO(httpx.get(f"{pacs.url}/instances/{found}/file", auth=pacs.auth, timeout=10).content)
    )
    facility = identifiers(pydicom.dcmread(io.BytesIO(image)))
    assert identifiers(in_facility) == facility

    handed_out = pydicom.dcmread(
        io.BytesIO(client.get(f"/v1/records/{case_id}/second-opinion/{event.sop_instance_uid}").content)
    )
    [image_row] = uploaded.files
    image_out = pydicom.dcmread(
        io.BytesIO(client.get(f"/v1/records/{case_id}/files/{image_row.sha256}").content)
    )
    ours = pydicom.Dataset()
    for keyword, value in our_ids(case_id, {}).items():  # no issuer details: none describe ours
        setattr(ours, keyword, value)
    assert identifiers(handed_out) == identifiers(image_out) == identifiers(ours)
    assert handed_out.SOPInstanceUID == in_facility.SOPInstanceUID
    for copy_out in (handed_out, image_out):  # the facility's values kept, exactly as sent back
        [originals] = copy_out.OriginalAttributesSequence[-1].ModifiedAttributesSequence
        assert identifiers(originals) == facility


def queued_unplaced_while_held(
    engine: Engine, settings: Settings, case_id: str, study: str, partner: str
) -> EncapsulatedReport:
    """Images held for their identity, and a report stored and queued as the version before last did then
    (records.second_opinion at 04dbb8f): released as it came, with intake's identity, to be placed at send."""
    store_images(engine, settings, case_id, study, birth_date="19790101")
    event = report_for(case_id, study)[0]
    with Session(engine) as session:
        received = ObjectStore.for_settings(settings).receive(
            io.BytesIO(base64.b64decode(event.dicom_base64)), position=1, total=1, limit=10**7
        )
        entry = Entry(received, None, "the second-opinion report", declared_type="application/dicom")
        outcome = uploads.accept_entries(
            case_id, [entry], session, settings, source=REPORT_SOURCE, in_transaction=True
        )
        [stored] = outcome.files
        assert stored.released
        plan_return(
            session,
            case_id=case_id,
            partner_id=partner,
            sop_instance_uid=event.sop_instance_uid,
            sha256=stored.sha256,
            version=1,
        )
        session.commit()
    return event


def test_a_report_queued_unplaced_by_an_earlier_version_while_images_were_held_goes_back_placed(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    """The version before last stored a report that came while the case's images waited for an identity
    decision as it came (released, intake's identity) and queued its return, to be placed at send time. This
    version sends what is stored, as stored: after the upgrade and the decision the facility's PACS got that
    report with intake's birth date, exam date and accession, beside the images' identity. Placed once now,
    after the decision, and sent (and handed out) as placed."""
    study = "1.2.826.0.1.3680043.10.7100.18"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-upgraded",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    event = queued_unplaced_while_held(engine, settings, case_id, study, "clinic-upgraded")
    assert run_due(engine, settings, OPTIONS) == 0  # waits for the decision

    accept_held(engine, settings, case_id, held_import(client, case_id))
    assert (
        run_due(engine, settings, OPTIONS) == 0
    )  # placed first, its return queued again for the copy placed
    assert run_due(engine, settings, OPTIONS) == 1

    [sent] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (sent["status"], sent["sop_instance_uid"]) == ("done", event.sop_instance_uid)
    found = one_instance(pacs, StudyInstanceUID=study, Modality="DOC")
    tags = httpx.get(f"{pacs.url}/instances/{found}/simplified-tags", auth=pacs.auth, timeout=10).json()
    assert (tags["PatientBirthDate"], tags["StudyDate"], tags["AccessionNumber"]) == (
        "19790101",
        "20261118",
        "RIS0042",
    )
    handed_out = pydicom.dcmread(
        io.BytesIO(client.get(f"/v1/records/{case_id}/second-opinion/{event.sop_instance_uid}").content)
    )
    assert (handed_out.SOPInstanceUID, handed_out.PatientBirthDate, handed_out.StudyDate) == (
        tags["SOPInstanceUID"],
        "19790101",
        "20261118",
    )


def test_such_a_report_of_a_case_cancelled_before_the_upgrade_is_not_sent(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    """The version before last did not cancel a case's returns: one left pending is cancelled, not placed."""
    study = "1.2.826.0.1.3680043.10.7100.19"
    case_id = returning_case(
        client,
        engine,
        settings,
        "clinic-upgraded-cancelled",
        study,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
    )
    queued_unplaced_while_held(engine, settings, case_id, study, "clinic-upgraded-cancelled")
    accept_held(engine, settings, case_id, held_import(client, case_id))
    with Session(engine) as session:  # cancelled then: the request closed, its return left as it was
        request = session.get(RecordRequest, case_id)
        assert request is not None
        request.cancelled_at = datetime.now(UTC)
        session.add(request)
        session.commit()
    assert run_due(engine, settings, OPTIONS) == 0
    [gone] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (gone["status"], gone["last_error"]) == ("cancelled", "the case was cancelled")
    assert in_pacs(pacs, study) == []
