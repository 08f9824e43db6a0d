"""The second-opinion report stored into the study it reads carries that study's identity as the images that
records holds have it (reconciled), not intake's: a viewer groups by these attributes."""

import base64
import io
import threading
import time
import uuid
from datetime import UTC, date, datetime

import pydicom
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts import new_event
from contracts.commands import ReconcileIdentity
from contracts.events import EncapsulatedReport
from services.common.config import Settings
from services.records import consumer, handlers, uploads
from services.records.models import ImportStatus, RecordFile, RecordImport
from services.records.reconcile import coerced_header, our_identifiers
from services.records.report_study import REPORT_SOURCE, stored_report
from services.records.store import ObjectStore
from services.review.encapsulated_pdf import encapsulated_pdf
from tests.dicom_factory import make_us_instance
from tests.integration.test_records_dicomweb import engine, new_study, open_case
from tests.unit.test_review_matching import request as match_request

__all__ = ["engine"]  # the records database fixture, shared with the DICOMweb tests

IMAGE_STUDY = {  # what the facility's modality wrote, and intake never knew
    "StudyDate": "20261118",
    "StudyTime": "093000",
    "AccessionNumber": "RIS0042",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyID": "US77",
}


def store_images(engine: Engine, settings: Settings, case_id: str, study: str, birth_date: str) -> None:
    files = []
    for n in (1, 2):
        dataset = pydicom.dcmread(
            io.BytesIO(
                make_us_instance(
                    None,
                    study_uid=study,
                    series_uid=study + ".1",
                    patient_name="DOE^JANE^MARIE",
                    birth_date=birth_date,
                )
            )
        )
        for keyword, value in IMAGE_STUDY.items():
            setattr(dataset, keyword, value)
        dataset.InstanceNumber = n
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append(uploads.IncomingFile(io.BytesIO(buffer.getvalue()), "application/dicom"))
    with Session(engine) as session:
        uploads.accept_upload(case_id, files, session, settings)


def send_report(engine: Engine, settings: Settings, case_id: str, study: str) -> pydicom.Dataset:
    """The review service's report, written from intake's data as it is today, through the records consumer."""
    base = match_request("pelvic", "CA")
    match = base.model_copy(
        update={
            "case_id": case_id,
            "exam": base.exam.model_copy(
                update={"performed_on": date(2026, 11, 20), "accession_number": "ACC-INTAKE"}
            ),
            "patient": base.patient.model_copy(update={"mrn": "MRN1"}),
            "study": base.study.model_copy(update={"study_instance_uid": study}),
        }
    )
    dicom = encapsulated_pdf(
        pdf=b"%PDF-1.4\n%%EOF\n",
        request=match,
        report_id=str(uuid.uuid4()),
        version=1,
        issued=datetime.now(UTC),
    )
    sent = pydicom.dcmread(io.BytesIO(dicom))
    event = EncapsulatedReport(
        case_id=case_id,
        report_id="r",
        version=1,
        sop_instance_uid=sent.SOPInstanceUID,
        dicom_base64=base64.b64encode(dicom).decode(),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=event, subject=case_id), settings
        )
        session.commit()
    return sent


def stored(engine: Engine, settings: Settings, case_id: str, sop: str) -> tuple[RecordFile, pydicom.Dataset]:
    with Session(engine) as session:
        row = session.exec(
            select(RecordFile).where(RecordFile.case_id == case_id, RecordFile.sop_instance_uid == sop)
        ).one()
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    return row, pydicom.dcmread(path, stop_before_pixels=True)


def test_the_report_takes_the_study_identity_of_the_images(engine: Engine, settings: Settings) -> None:
    case_id = open_case(engine, settings)
    study = new_study()
    store_images(engine, settings, case_id, study, birth_date="19800101")
    sent = send_report(engine, settings, case_id, study)
    assert (sent.StudyDate, sent.AccessionNumber, sent.StudyID) == ("20261120", "ACC-INTAKE", "")  # intake's

    row, report = stored(engine, settings, case_id, sent.SOPInstanceUID)
    assert row.released and row.study_instance_uid == study
    for keyword, value in IMAGE_STUDY.items():
        assert str(report[keyword].value) == value, keyword
    assert (str(report.PatientName), report.PatientID) == ("DOE^JANE^MARIE", "MRN1")
    assert (report.PatientBirthDate, report.PatientSex, report.StudyInstanceUID) == ("19800101", "F", study)
    assert report.EncapsulatedDocument.startswith(b"%PDF") and report.Modality == "DOC"  # the rest as sent

    # Handed out (WADO-RS), report and images carry the same reconciled identifiers.
    ids = our_identifiers(case_id, {})
    served = coerced_header(
        ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256), ids, row.created_at
    )
    assert (served.PatientID, served.IssuerOfPatientID, served.AccessionNumber) == (
        ids["PatientID"],
        "SECONDOPINION",
        ids["AccessionNumber"],
    )


def test_images_accepted_despite_a_difference_give_the_report_their_identity(
    engine: Engine, settings: Settings
) -> None:
    """IRWF: a human accepted images whose birth date differs from intake's; the report follows the images
    and is released at once (the identity was already decided), not held for a second decision."""
    case_id = open_case(engine, settings)
    study = new_study()
    store_images(engine, settings, case_id, study, birth_date="19790101")
    with Session(engine) as session:
        [held] = session.exec(select(RecordImport).where(RecordImport.case_id == case_id)).all()
        decision = ReconcileIdentity(
            case_id=case_id,
            import_id=held.import_id,
            decision="accept",
            decided_by="ops",
            reason="same patient",
        )
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=decision, subject=case_id), settings
        )
        session.commit()

    sent = send_report(engine, settings, case_id, study)

    row, report = stored(engine, settings, case_id, sent.SOPInstanceUID)
    assert sent.PatientBirthDate == "19800101" and report.PatientBirthDate == "19790101"
    assert row.released


def test_a_report_placed_into_another_study_than_it_named_is_another_instance(
    engine: Engine, settings: Settings
) -> None:
    # The review named a study records does not hold (e.g. intake's UID); records holds the images of another.
    # Filed there, the copy must not share its SOP Instance UID with the review's, filed in the first study.
    case_id = open_case(engine, settings)
    held = new_study()
    store_images(engine, settings, case_id, held, birth_date="19800101")
    sent = send_report(engine, settings, case_id, new_study())

    with Session(engine) as session:
        [row] = session.exec(
            select(RecordFile).where(RecordFile.case_id == case_id, RecordFile.modality == "DOC")
        ).all()
    _, report = stored(engine, settings, case_id, str(row.sop_instance_uid))
    assert report.StudyInstanceUID == held
    assert report.SOPInstanceUID != sent.SOPInstanceUID
    assert report.SeriesInstanceUID != sent.SeriesInstanceUID
    assert report.file_meta.MediaStorageSOPInstanceUID == report.SOPInstanceUID


def apply_decision(session: Session, settings: Settings, case_id: str, decision: str) -> None:
    """A person's decision on the case's one import held for its identity, through the records consumer, in
    `session`'s transaction (the caller commits)."""
    [held] = session.exec(
        select(RecordImport).where(
            RecordImport.case_id == case_id, RecordImport.status == ImportStatus.IDENTITY_MISMATCH
        )
    ).all()
    command = ReconcileIdentity(
        case_id=case_id, import_id=held.import_id, decision=decision, decided_by="ops", reason="checked"
    )
    consumer.handle(
        session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
    )


def decide(engine: Engine, settings: Settings, case_id: str, decision: str) -> None:
    with Session(engine) as session:
        apply_decision(session, settings, case_id, decision)
        session.commit()


def report_rows(engine: Engine, case_id: str) -> list[tuple[RecordFile, RecordImport]]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(RecordFile, RecordImport)
                .join(RecordImport, col(RecordFile.import_id) == col(RecordImport.import_id))
                .where(RecordFile.case_id == case_id, RecordImport.source == REPORT_SOURCE)
            ).all()
        )


def test_a_report_come_while_the_images_wait_is_kept_aside_then_placed_after_the_decision(
    engine: Engine, settings: Settings
) -> None:
    # Stored with intake's identity now, it would be handed out with one identity and, placed later, with
    # another under the same SOP Instance UID. It waits unreleased instead, and only the placed copy remains.
    case_id = open_case(engine, settings)
    study = new_study()
    store_images(engine, settings, case_id, study, birth_date="19790101")
    sent = send_report(engine, settings, case_id, study)

    [(kept, kept_import)] = report_rows(engine, case_id)
    assert (kept.released, kept_import.status) == (False, ImportStatus.AWAITING_PLACEMENT)
    assert not kept.storage_path.startswith("dicomweb:")  # never in the image archive under that UID

    decide(engine, settings, case_id, "accept")

    [(placed, placed_import)] = report_rows(engine, case_id)
    assert (placed.released, placed_import.status) == (True, ImportStatus.RELEASED)
    assert placed.sop_instance_uid == sent.SOPInstanceUID  # the study it named: the same instance
    _, report = stored(engine, settings, case_id, sent.SOPInstanceUID)
    assert (report.PatientBirthDate, str(report.PatientName)) == ("19790101", "DOE^JANE^MARIE")
    assert not ObjectStore.for_settings(settings).local_path(kept.storage_path, kept.sha256).exists()


def test_a_report_that_comes_while_the_decision_is_applied_waits_for_it_and_is_placed(
    engine: Engine, settings: Settings
) -> None:
    """Two records processes: one applies the identity decision, the other stores the report meanwhile. The
    report must not read the images as still held and wait aside for a decision already made."""
    case_id = open_case(engine, settings)
    study = new_study()
    store_images(engine, settings, case_id, study, birth_date="19790101")
    with Session(engine) as deciding:
        handlers.lock_request(deciding, case_id)  # the decision's transaction has the case
        storing = threading.Thread(target=send_report, args=(engine, settings, case_id, study))
        storing.start()
        with engine.connect() as watch:  # until the report's transaction waits for the case's lock
            for _ in range(200):
                waiting = watch.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock'")
                ).scalar()  # fmt: skip
                if waiting or not storing.is_alive():
                    break
                time.sleep(0.05)
        apply_decision(deciding, settings, case_id, "accept")
        deciding.commit()
    storing.join(30)

    [(placed, placed_import)] = report_rows(engine, case_id)
    assert (placed.released, placed_import.status) == (True, ImportStatus.RELEASED)
    _, report = stored(engine, settings, case_id, placed.sop_instance_uid)
    assert str(report.PatientName) == "DOE^JANE^MARIE"


def test_images_rejected_after_the_report_came_leave_it_with_the_cases_identity(
    engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    study = new_study()
    store_images(engine, settings, case_id, study, birth_date="19790101")
    sent = send_report(engine, settings, case_id, study)

    decide(engine, settings, case_id, "reject")

    [(row, record_import)] = report_rows(engine, case_id)
    assert (row.released, record_import.status) == (True, ImportStatus.RELEASED)
    _, report = stored(engine, settings, case_id, sent.SOPInstanceUID)
    assert (report.PatientBirthDate, report.StudyDate) == ("19800101", "20261120")  # as the review sent it


def test_the_copy_placed_into_another_study_is_found_by_the_uid_the_review_issued(
    engine: Engine, settings: Settings
) -> None:
    case_id = open_case(engine, settings)
    held = new_study()
    store_images(engine, settings, case_id, held, birth_date="19800101")
    sent = send_report(engine, settings, case_id, new_study())

    with Session(engine) as session:
        found = stored_report(session, case_id, sent.SOPInstanceUID)
        assert stored_report(session, case_id, "1.2.3.4") is None
    assert found is not None
    row, _ = found
    assert (row.study_instance_uid, row.sop_instance_uid != sent.SOPInstanceUID) == (held, True)
