"""Importing outside studies: CDs as ZIP or folder (IHE PDI), a hostile-input corpus, identity reconciliation
(IHE IRWF), adequacy, reminders and cancellation, on the real PostgreSQL through the API and consumer.handle."""

import hashlib
import io
import stat
import uuid
import zipfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, CollectRecords, Exam, Patient, new_event
from contracts.commands import ReconcileIdentity, RemindRecords
from contracts.events import (
    CaseCancelled,
    IdentityMismatch,
    RecordsAssembled,
    RecordsIncomplete,
    RecordsNeeded,
)
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Outbox, make_engine
from services.common.errors import PoisonMessage
from services.common.http import create_app
from services.records import api, consumer, uploads
from services.records.limits import ImportLimits, get_limits
from services.records.models import RecordFile
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.hostile_corpus import ZIP, HostileCase, cd_folder, corpus, zip_folder, zip_of
from tests.keys import operations_headers

REPORT = ("report.txt", b"IMPRESSION: complex adnexal cyst.", "text/plain")
LIMITS = ImportLimits(max_archive_members=50, max_pixel_bytes=20_000, max_header_bytes=1024 * 1024)


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
    app.dependency_overrides[get_limits] = lambda: LIMITS
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c


def send(
    engine: Engine, settings: Settings, data: BaseModel, case_id: str, message_id: str | None = None
) -> None:
    event = new_event(
        id=message_id or str(uuid.uuid4()), source="/workflows/case", data=data, subject=case_id
    )
    with Session(engine) as session:
        consumer.handle(session, event, settings)
        session.commit()


def open_case(engine: Engine, settings: Settings, exam_type: str = "pelvic") -> str:
    case_id = str(uuid.uuid4())
    patient = Patient(
        family_name="Doe",
        given_name="Jane",
        birth_date=date(1980, 1, 1),
        sex="female",
        mrn="MRN1",
        state="CA",
    )
    exam = Exam(exam_type=exam_type, performed_on=date(2026, 11, 20), facility="Bayview Imaging")
    send(
        engine,
        settings,
        CollectRecords(case_id=case_id, patient=patient, exam=exam, partner_id="p1"),
        case_id,
    )
    return case_id


@pytest.fixture
def case_id(engine: Engine, settings: Settings) -> str:
    return open_case(engine, settings)


def events(engine: Engine, case_id: str, model: type[Any]) -> list[Any]:
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.routing_key == model.TYPE)).all()
    found = [CloudEvent.model_validate_json(row.body) for row in rows]
    return [model.model_validate(e.data) for e in found if e.subject == case_id]


def rows(engine: Engine, case_id: str) -> list[RecordFile]:
    with Session(engine) as session:
        return list(session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all())


def study_uid() -> str:
    return f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"


def us(study: str, **kwargs: Any) -> bytes:
    return make_us_instance(None, study_uid=study, series_uid=study + ".1", **kwargs)


def upload(client: TestClient, case_id: str, *files: tuple[str, bytes, str]):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/records/{case_id}/files", files=[("files", f) for f in files])


def test_a_cd_as_zip_with_dicomdir_imports_the_listed_images_and_ignores_the_viewer(
    client: TestClient, engine: Engine, case_id: str, tmp_path: Path
) -> None:
    study = study_uid()
    cd = tmp_path / "cd"
    cd_folder(
        cd,
        [us(study), us(study), us(study, frames=4)],
        extras={
            "VIEWER/viewer.exe": b"MZ\x90\x00" + bytes(300),
            "AUTORUN.INF": b"[autorun]\r\nopen=viewer.exe",
        },
    )
    response = upload(client, case_id, REPORT, ("cd.zip", zip_folder(cd), ZIP))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["import_status"], body["new_files"]) == ("assembled", "released", 4)
    assert sorted(f["kind"] for f in body["files"]) == ["dicom", "dicom", "dicom", "report"]
    [assembled] = events(engine, case_id, RecordsAssembled)
    assert (assembled.study.instance_count, assembled.study.multiframe_count) == (3, 1)
    # The CD's images name no view: the only warning says the standard views cannot be checked.
    assert [w for w in assembled.warnings if "views cannot be checked" not in w] == []


def test_a_cd_whose_dicomdir_lists_nothing_imports_its_images_and_still_ignores_the_viewer(
    client: TestClient, engine: Engine, case_id: str, tmp_path: Path
) -> None:
    """A DICOMDIR with no directory record (a burner that failed) indexes nothing: the CD's images were
    ignored and the upload answered 201 with only "an image is missing". They are read as found now."""
    study = study_uid()
    cd = tmp_path / "cd"
    cd_folder(cd, [us(study), us(study, frames=2)], extras={"VIEWER/viewer.exe": b"MZ\x90\x00" + bytes(300)})
    dicomdir = pydicom.dcmread(cd / "DICOMDIR")
    dicomdir.DirectoryRecordSequence = pydicom.Sequence([])
    dicomdir.save_as(cd / "DICOMDIR", enforce_file_format=True)
    response = upload(client, case_id, REPORT, ("cd.zip", zip_folder(cd), ZIP))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["new_files"]) == ("assembled", 3)
    assert sorted(f["kind"] for f in body["files"]) == ["dicom", "dicom", "report"]


def test_a_folder_upload_with_relative_paths_and_a_dicomdir(
    client: TestClient, engine: Engine, case_id: str, tmp_path: Path
) -> None:
    study = study_uid()
    cd = tmp_path / "cd"
    paths = cd_folder(cd, [us(study), us(study, frames=2)])
    files = [(p.relative_to(tmp_path).as_posix(), p.read_bytes(), "application/octet-stream") for p in paths]
    response = upload(client, case_id, REPORT, *files)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "assembled"
    assert len(rows(engine, case_id)) == 3  # the DICOMDIR itself is an index, not a record


def test_a_whole_cd_as_a_folder_keeps_its_viewer_out_and_its_iso_9660_names_match(
    client: TestClient, engine: Engine, case_id: str, tmp_path: Path
) -> None:
    """The CD folder as a browser sends it (viewer and autorun beside the DICOMDIR) imports like its ZIP,
    and names as some CD readers copy them ("IM000000.;1", "IM000000.") match the DICOMDIR's file IDs."""
    study = study_uid()
    cd = tmp_path / "cd"
    extras = {"VIEWER/VIEWER.EXE": b"MZ\x90\x00" + bytes(300), "AUTORUN.INF": b"[autorun]\r\nopen=x"}
    paths = cd_folder(cd, [us(study), us(study, frames=2)], extras=extras)

    def sent_as(path: Path) -> str:
        name = path.relative_to(tmp_path).as_posix()
        return name + ".;1" if path.parent.name.startswith("SE") else name

    files = [(sent_as(p), p.read_bytes(), "application/octet-stream") for p in paths]
    response = upload(client, case_id, REPORT, *files)
    assert response.status_code == 201, response.text
    assert len(rows(engine, case_id)) == 3


class Unseekable(io.RawIOBase):
    """A stream that can only be read forward (a pipe, a socket): a ZIP from it is copied before expanding."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("seekable", [True, False], ids=["spooled", "forward-only"])
def test_a_zip_imports_the_same_from_a_spooled_or_a_forward_only_stream(
    engine: Engine, settings: Settings, tmp_path: Path, seekable: bool
) -> None:
    case_id = open_case(engine, settings)
    study = study_uid()
    cd = tmp_path / "cd"
    cd_folder(cd, [us(study), us(study, frames=3)])
    data = zip_folder(cd)
    stream = io.BytesIO(data) if seekable else io.BufferedReader(Unseekable(data))
    assert stream.seekable() is seekable
    with Session(engine, expire_on_commit=False) as session:
        outcome = uploads.accept_upload(
            case_id, [uploads.IncomingFile(stream, ZIP, "cd.zip")], session, settings, limits=LIMITS
        )
    assert outcome.new_files == 2
    stored = ObjectStore.for_settings(settings)
    for row in rows(engine, case_id):
        assert hashlib.sha256(stored.path(row.storage_path).read_bytes()).hexdigest() == row.sha256
    assert list(stored.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    "case", [c for c in corpus() if any(f[2] == ZIP for f in c.files)], ids=lambda c: c.name
)
def test_a_hostile_zip_from_a_forward_only_stream_is_refused_too(
    engine: Engine, settings: Settings, case_id: str, case: HostileCase
) -> None:
    store = ObjectStore.for_settings(settings)
    streams = [uploads.IncomingFile(io.BufferedReader(Unseekable(f[1])), f[2], None) for f in case.files]
    with Session(engine, expire_on_commit=False) as session, pytest.raises(Exception) as refused:
        uploads.accept_upload(case_id, streams, session, settings, limits=LIMITS)
    assert case.problem in str(refused.value)
    assert rows(engine, case_id) == []
    assert not store.tmp_dir.exists() or list(store.tmp_dir.iterdir()) == []


def post_zip(client: TestClient, case_id: str, data: bytes, content_type: str = ZIP):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/records/{case_id}/archive", content=data, headers={"Content-Type": content_type})


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_a_cd_sent_as_a_zip_body_imports_like_a_multipart_upload(
    client: TestClient, engine: Engine, settings: Settings, case_id: str, tmp_path: Path, compression: int
) -> None:
    study = study_uid()
    cd = tmp_path / "cd"
    paths = cd_folder(cd, [us(study), us(study), us(study, frames=4)], extras={"AUTORUN.INF": b"[autorun]"})
    data = zip_of([(p.relative_to(cd).as_posix(), p.read_bytes()) for p in paths], compression=compression)
    assert upload(client, case_id, REPORT).status_code == 201
    response = post_zip(client, case_id, data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["import_status"], body["new_files"]) == ("assembled", "released", 3)
    assert [f["kind"] for f in body["files"]] == ["dicom"] * 3
    [assembled] = events(engine, case_id, RecordsAssembled)
    assert (assembled.study.instance_count, assembled.study.multiframe_count) == (3, 1)
    stored = ObjectStore.for_settings(settings)
    for row in rows(engine, case_id):
        assert hashlib.sha256(stored.path(row.storage_path).read_bytes()).hexdigest() == row.sha256
    assert list(stored.tmp_dir.iterdir()) == []
    again = post_zip(client, case_id, data).json()
    assert (again["new_files"], again["duplicates"]) == (0, 3)


# Every hostile case through the multipart route; the single-ZIP ones also as a ZIP body (/archive).
HOSTILE = [pytest.param("files", c, id=c.name) for c in corpus()] + [
    pytest.param("archive", c, id=f"zip body, {c.name}")
    for c in corpus()
    if len(c.files) == 1 and c.files[0][2] == ZIP
]


@pytest.mark.parametrize(("route", "case"), HOSTILE)
def test_hostile_input_is_refused_with_nothing_written(
    client: TestClient, engine: Engine, settings: Settings, case_id: str, route: str, case: HostileCase
) -> None:
    store = ObjectStore.for_settings(settings)
    before = {p for p in settings.data_dir.rglob("*") if p.is_file()}
    if route == "files":
        response = upload(client, case_id, REPORT, *case.files)
    else:
        response = post_zip(client, case_id, case.files[0][1])
    assert response.status_code == case.status, response.text
    detail = response.json()["detail"]
    assert case.problem in detail and "nothing from this upload was stored" in detail
    assert rows(engine, case_id) == []
    assert {p for p in settings.data_dir.rglob("*") if p.is_file()} == before
    assert not store.tmp_dir.exists() or list(store.tmp_dir.iterdir()) == []


def zip_with_entries_that_are_not_files(image: bytes) -> bytes:
    """A CD zipped with `zip -y` on a workstation: a symbolic link (named for the patient, pointing outside),
    a device file and a named pipe stored by their Unix mode, and a folder entry that holds data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("DICOM/", b"")  # an empty folder entry: simply not a file
        zf.writestr("DICOM/IM1", image)
        for name, mode, data in [
            ("DOE_JANE_19800101/report.txt", stat.S_IFLNK | 0o777, b"/etc/passwd"),
            ("DICOM/tty", stat.S_IFCHR | 0o600, b""),
            ("DICOM/pipe", stat.S_IFIFO | 0o600, b""),
            ("DOE_JANE/", stat.S_IFDIR | 0o755, b"IMPRESSION: hidden in a folder entry"),
        ]:
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, mode << 16
            zf.writestr(info, data)
    return buffer.getvalue()


@pytest.mark.parametrize("route", ["files", "archive"])
def test_archive_entries_that_are_not_files_are_left_out_and_named_by_position(
    client: TestClient, engine: Engine, settings: Settings, case_id: str, route: str
) -> None:
    """A symbolic link in a ZIP was imported as a text file holding the path it points to (a "report"
    reading /etc/passwd); a device file or pipe as an empty file. Each is left out now, the image imported,
    and the answer says which member and why, by position: the paths here carry the patient's name."""
    data = zip_with_entries_that_are_not_files(us(study_uid()))
    response = (
        upload(client, case_id, ("cd.zip", data, ZIP))
        if route == "files"
        else post_zip(client, case_id, data)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["new_files"], [f["kind"] for f in body["files"]]) == (1, ["dicom"])
    member = "member {} of 5 of file 1 of 1" if route == "files" else "member {} of the ZIP archive"
    first = 2 if route == "files" else 3  # the streamed body numbers the empty folder entry too
    what = [
        "is a symbolic link (its data is the path it points to, never followed)",
        "is a device file",
        "is a named pipe",
        "is a folder entry holding 36 bytes",
    ]
    assert body["warnings"] == [
        f"{member.format(first + i)} {w}: left out, the rest of the upload was imported; add the file itself "
        "if it is needed"
        for i, w in enumerate(what)
    ]
    assert "DOE" not in response.text and "passwd" not in response.text
    assert [r.kind for r in rows(engine, case_id)] == ["dicom"]
    store = ObjectStore.for_settings(settings)
    assert not store.tmp_dir.exists() or list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("route", ["files", "archive"])
def test_a_link_whose_path_leaves_the_root_is_left_out_on_both_routes(
    client: TestClient, engine: Engine, settings: Settings, case_id: str, route: str
) -> None:
    """A symbolic link named `../…` is never written or followed on either route; the streamed route, which
    learns what an entry is only from the directory at the end, refused the whole CD for it while the
    multipart route left it out. Both leave it out now; a regular file named so is still refused (the
    hostile corpus)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("DICOM/IM1", us(study_uid()))
        info = zipfile.ZipInfo("../../outside/link")
        info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd")
    data = buffer.getvalue()
    before = {p for p in settings.data_dir.rglob("*") if p.is_file()}
    response = (
        upload(client, case_id, ("cd.zip", data, ZIP))
        if route == "files"
        else post_zip(client, case_id, data)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["new_files"], [f["kind"] for f in body["files"]]) == (1, ["dicom"])
    [warning] = body["warnings"]
    assert "member 2 of" in warning and "is a symbolic link" in warning and "left out" in warning
    assert [
        p for p in settings.data_dir.rglob("*") if p.is_file() and p not in before and "outside" in str(p)
    ] == []


def test_an_explicit_vr_big_endian_instance_is_imported_and_handed_out_whole(
    client: TestClient, engine: Engine, case_id: str
) -> None:
    """The retired Explicit VR Big Endian (older carts and archives still hold it): its Pixel Data length,
    read as little endian, made a complete file look truncated, and the upload was refused."""
    dataset = pydicom.dcmread(io.BytesIO(us(study_uid())))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, implicit_vr=False, little_endian=False, enforce_file_format=True)
    response = upload(client, case_id, ("a.dcm", buffer.getvalue(), "application/dicom"))
    assert response.status_code == 201, response.text
    [stored] = response.json()["files"]
    served = pydicom.dcmread(
        io.BytesIO(client.get(f"/v1/records/{case_id}/files/{stored['sha256']}").content)
    )
    assert served.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    assert (served.PatientID, served.PixelData) == (f"SO-{case_id}", dataset.PixelData)


def test_the_zip_body_route_says_what_it_takes(client: TestClient, engine: Engine, case_id: str) -> None:
    cd = zip_of([("IM1", us(study_uid()))])
    wrong_type = post_zip(client, case_id, cd, "multipart/form-data; boundary=x")
    assert wrong_type.status_code == 415 and "Content-Type: application/zip" in wrong_type.json()["detail"]
    unknown = post_zip(client, str(uuid.uuid4()), cd)
    assert unknown.status_code == 404 and "no records were requested" in unknown.json()["detail"]
    not_zip = post_zip(client, case_id, b"%PDF-1.7" * 20)
    assert not_zip.status_code == 422 and "is not a ZIP file" in not_zip.json()["detail"]
    assert rows(engine, case_id) == []


def test_a_different_birth_date_holds_the_import_until_a_human_accepts_it(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    study = study_uid()
    response = upload(
        client, case_id, REPORT, ("a.dcm", us(study, birth_date="19800110"), "application/dicom")
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["import_status"]) == ("requested", "identity_mismatch")
    [mismatch] = events(engine, case_id, IdentityMismatch)
    assert (mismatch.import_id, mismatch.differences) == (body["import_id"], ["PatientBirthDate"])
    assert "1980" not in mismatch.model_dump_json()
    records = client.get(f"/v1/records/{case_id}").json()
    assert [f["kind"] for f in records["files"]] == ["report"]  # nothing of the import is released
    assert records["imports"][0]["status"] == "identity_mismatch"
    held_sha = next(f["sha256"] for f in body["files"] if f["kind"] == "dicom")
    assert client.get(f"/v1/records/{case_id}/files/{held_sha}").status_code == 409
    assert events(engine, case_id, RecordsAssembled) == []

    decision = ReconcileIdentity(
        case_id=case_id, import_id=body["import_id"], decision="accept", decided_by="ops-1", reason="typo"
    )
    send(engine, settings, decision, case_id)
    send(engine, settings, decision, case_id)  # a repeated decision changes nothing
    assert client.get(f"/v1/records/{case_id}").json()["status"] == "assembled"
    assert len(events(engine, case_id, RecordsAssembled)) == 1
    served = pydicom.dcmread(io.BytesIO(client.get(f"/v1/records/{case_id}/files/{held_sha}").content))
    assert served.PatientID == f"SO-{case_id}"
    assert served.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientID == "MRN1"


def test_two_patients_in_one_upload_are_held_and_a_rejection_discards_them(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    study = study_uid()
    response = upload(
        client,
        case_id,
        ("a.dcm", us(study), "application/dicom"),
        ("b.dcm", us(study, patient_name="ROE^RICHARD", patient_id="X9", sex="M"), "application/dicom"),
    )
    body = response.json()
    assert body["import_status"] == "identity_mismatch"
    [mismatch] = events(engine, case_id, IdentityMismatch)
    assert mismatch.differences == ["PatientID", "PatientName", "PatientSex"]
    stored = [ObjectStore.for_settings(settings).path(r.storage_path) for r in rows(engine, case_id)]
    decision = ReconcileIdentity(
        case_id=case_id, import_id=body["import_id"], decision="reject", decided_by="ops-1", reason="wrong CD"
    )
    # Applied, then rolled back (a consumer batch that broke, a crash before the commit): the files stay,
    # and the decision applied again finds them.
    event = new_event(id=str(uuid.uuid4()), source="/workflows/case", data=decision, subject=case_id)
    with Session(engine) as session:
        consumer.handle(session, event, settings)
        session.rollback()
    assert len(rows(engine, case_id)) == 2 and all(p.exists() for p in stored)
    send(engine, settings, decision, case_id)
    assert rows(engine, case_id) == []
    assert not any(p.exists() for p in stored)
    assert client.get(f"/v1/records/{case_id}").json()["imports"][0]["status"] == "rejected"
    with pytest.raises(PoisonMessage, match="names an import this case does not have"):
        send(engine, settings, decision.model_copy(update={"import_id": "nope"}), case_id)


def test_adequacy_requires_cine_for_obstetrics_and_warns_otherwise(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    obstetric = open_case(engine, settings, "obstetric")
    study = study_uid()
    response = upload(client, obstetric, REPORT, ("a.dcm", us(study), "application/dicom"))
    assert response.json()["status"] == "requested"
    [incomplete] = events(engine, obstetric, RecordsIncomplete)
    assert incomplete.missing == [
        "a cine clip (a multi-frame ultrasound instance), which this exam type needs"
    ]
    upload(client, obstetric, ("a.dcm", us(study), "application/dicom"))  # same missing set: no new event
    assert len(events(engine, obstetric, RecordsIncomplete)) == 1

    pelvic = open_case(engine, settings, "pelvic")
    response = upload(
        client,
        pelvic,
        REPORT,
        ("a.dcm", us(study, calibrated=False, burned_in_annotation="YES"), "application/dicom"),
    )
    assert response.json()["status"] == "assembled"
    [assembled] = events(engine, pelvic, RecordsAssembled)
    assert assembled.warnings == [
        "no cine clip: the second reader sees still images only",
        "1 of 1 ultrasound instance(s) have no calibrated region (Sequence of Ultrasound Regions): "
        "distances cannot be measured on them",
        "1 ultrasound instance(s) carry burned-in annotation (patient data in the pixels)",
        "the standard pelvic views cannot be checked: no instance names its view "
        "(ViewCodeSequence, ImageComments or SeriesDescription)",
    ]
    adequacy = client.get(f"/v1/records/{pelvic}").json()["adequacy"]
    assert (adequacy["calibrated_instances"], adequacy["burned_in_annotation_instances"]) == (0, 1)


def test_the_carts_raw_data_is_not_taken_for_an_ultrasound_image(
    client: TestClient, engine: Engine, case_id: str
) -> None:
    """Raw Data Storage carries Modality US and no image: it was counted as the ultrasound image a case
    needs (the records assembled with nothing to look at) and as an uncalibrated ultrasound instance."""
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    raw = FileDataset("raw", {}, file_meta=meta, preamble=b"\0" * 128)
    raw.SOPClassUID, raw.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    study = study_uid()
    raw.StudyInstanceUID, raw.SeriesInstanceUID, raw.Modality = study, study + ".9", "US"
    raw.PatientName, raw.PatientID, raw.PatientBirthDate, raw.PatientSex = "DOE^JANE", "MRN1", "19800101", "F"
    buffer = io.BytesIO()
    raw.save_as(buffer, enforce_file_format=True)
    response = upload(client, case_id, REPORT, ("raw.dcm", buffer.getvalue(), "application/dicom"))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "requested"
    assert client.get(f"/v1/records/{case_id}").json()["missing"] == [
        "an ultrasound image (a DICOM instance with Modality US)"
    ]
    response = upload(client, case_id, ("a.dcm", us(study), "application/dicom"))
    assert response.json()["status"] == "assembled"
    [assembled] = events(engine, case_id, RecordsAssembled)
    assert assembled.study.instance_count == 1
    assert not [w for w in assembled.warnings if "calibrated region" in w]


def test_a_reminder_is_recorded_and_says_what_is_missing(
    engine: Engine, settings: Settings, case_id: str
) -> None:
    send(engine, settings, RemindRecords(case_id=case_id, attempt=1), case_id)
    send(engine, settings, RemindRecords(case_id=case_id, attempt=1), case_id, "redelivered")
    [needed] = events(engine, case_id, RecordsNeeded)
    assert needed.attempt == 1
    assert needed.missing == [
        "the original report (PDF, UTF-8 text, DICOM SR or FHIR DiagnosticReport)",
        "an ultrasound image (a DICOM instance with Modality US)",
    ]


def test_a_cancelled_case_refuses_uploads(
    client: TestClient, engine: Engine, settings: Settings, case_id: str
) -> None:
    cancelled = CaseCancelled(case_id=case_id, reason="patient withdrew", cancelled_by="ops-1")
    send(engine, settings, cancelled, case_id)
    send(engine, settings, cancelled, case_id)
    response = upload(client, case_id, REPORT)
    assert response.status_code == 409
    assert "cancelled" in response.json()["detail"]
    assert client.get(f"/v1/records/{case_id}").json()["status"] == "cancelled"
    send(engine, settings, RemindRecords(case_id=case_id, attempt=1), case_id)
    assert events(engine, case_id, RecordsNeeded) == []
