"""Query/retrieve from the originating PACS: a real Orthanc (its own config, studies loaded with dcmtk
storescu) answers our C-FIND, C-GET, C-MOVE (to our C-STORE SCP) and DICOMweb QIDO/WADO."""

import hashlib
import io
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts import CloudEvent, CollectRecords, Exam, Patient, new_event
from contracts.events import CaseCancelled, RecordsIncomplete
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import Outbox, make_engine
from services.common.http import create_app
from services.records import api, consumer, uploads
from services.records.dimse import StoreSCP
from services.records.models import RecordFile, RecordRetrieval, RecordSource, RetrievalStatus
from services.records.retrieval import RetrievalLoop, RetrievalSettings, run_due
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_port
from tests.keys import operations_headers
from tests.orthanc import PASSWORD, USER, Orthanc, running_orthanc

STUDY = "1.2.826.0.1.3680043.10.7001"
ACCESSION = "ACC7001"
OPTIONS = RetrievalSettings(retrieval_attempts=2, retrieval_backoff_seconds=0, retrieval_timeout_seconds=5)


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


@pytest.fixture(scope="module")
def scp(settings: Settings) -> Iterator[StoreSCP]:
    scp = StoreSCP(ObjectStore.for_settings(settings), free_port(), settings.max_upload_bytes)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, scp: StoreSCP) -> Iterator[Orthanc]:
    workdir = tmp_path_factory.mktemp("orthanc")
    files = []
    for index, frames in enumerate((1, 1, 6)):
        path = workdir / f"IM{index}.dcm"
        make_us_instance(
            path, study_uid=STUDY, series_uid=STUDY + ".1", frames=frames, accession_number=ACCESSION
        )
        files.append(path)
    with running_orthanc(workdir, scp_port=scp.port) as orthanc:
        orthanc.store(*files)
        yield orthanc


def open_case(engine: Engine, settings: Settings, partner_id: str, **exam: str) -> str:
    case_id = str(uuid.uuid4())
    command = CollectRecords(
        case_id=case_id,
        partner_id=partner_id,
        patient=Patient(
            family_name="Doe",
            given_name="Jane",
            birth_date=date(1980, 1, 1),
            sex="female",
            mrn="MRN1",
            state="CA",
        ),
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 20), facility="Bayview", **exam),  # type: ignore[arg-type]
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    return case_id


def configure(client: TestClient, partner_id: str, **source: object) -> None:
    response = client.put(f"/v1/records/sources/{partner_id}", json=source)
    assert response.status_code == 200, response.text


def retrieve(engine: Engine, settings: Settings, scp: StoreSCP | None = None) -> int:
    return run_due(engine, settings, scp=scp, retrieval_settings=OPTIONS)


@pytest.mark.parametrize(
    ("method", "exam"),
    [
        ("c-get", {"accession_number": ACCESSION}),
        ("c-move", {"study_instance_uid": STUDY}),
        # Neither named: the facility's patient id (MRN1) and the exam date find its ultrasound study.
        ("c-get", {}),
    ],
    ids=["c-get by accession", "c-move by study uid", "c-get by patient id and date"],
)
def test_dimse_find_then_retrieve_imports_the_named_study(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pacs: Orthanc,
    scp: StoreSCP,
    method: str,
    exam: dict[str, str],
) -> None:
    partner = f"clinic-{method}-{len(exam)}-{next(iter(exam), 'date').split('_')[0]}"
    configure(
        client,
        partner,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
        retrieve_method=method,
    )
    case_id = open_case(engine, settings, partner, **exam)
    pending = client.get(f"/v1/records/{case_id}").json()["retrievals"][0]
    assert (pending["status"], pending["started_at"]) == ("pending", None)

    assert retrieve(engine, settings, scp) >= 1
    records = client.get(f"/v1/records/{case_id}").json()
    [retrieval] = records["retrievals"]
    assert (retrieval["status"], retrieval["study_instance_uid"], retrieval["attempts"]) == ("done", STUDY, 1)
    # The retrieval's own duration, as the retrieve benchmark reads it.
    started, finished = (datetime.fromisoformat(retrieval[k]) for k in ("started_at", "finished_at"))
    assert started <= finished
    assert sorted(f["number_of_frames"] for f in records["files"]) == [1, 1, 6]
    assert records["imports"][0]["status"] == "released"
    assert records["missing"] == ["the original report (PDF, UTF-8 text, DICOM SR or FHIR DiagnosticReport)"]
    assert retrieve(engine, settings, scp) == 0  # nothing left to do


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_a_large_clip_arrives_byte_for_byte_with_nothing_left_in_the_temp_area(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pacs: Orthanc,
    scp: StoreSCP,
    tmp_path: Path,
    method: str,
) -> None:
    """A clip of some 10 MB arrives in hundreds of P-DATA fragments and more than one hashing batch: what
    records keeps is the dataset Orthanc sent, under its true SHA-256, and no spool file is left over."""
    study = f"{STUDY}.{len(method)}"
    clip = tmp_path / "CLIP.dcm"
    make_us_instance(clip, study_uid=study, series_uid=study + ".1", frames=160, rows=256, cols=256)
    pacs.store(clip)
    partner = f"clinic-large-{method}"
    source = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
    configure(client, partner, **source, retrieve_method=method)
    case_id = open_case(engine, settings, partner, study_instance_uid=study)

    retrieve(engine, settings, scp)
    records = client.get(f"/v1/records/{case_id}").json()
    assert records["retrievals"][0]["status"] == "done", records["retrievals"]
    [stored] = records["files"]
    store = ObjectStore.for_settings(settings)
    path = store.objects_dir / stored["sha256"][:2] / stored["sha256"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == stored["sha256"]
    sent, kept = pydicom.dcmread(clip), pydicom.dcmread(path)
    assert (kept.SOPInstanceUID, kept.NumberOfFrames) == (sent.SOPInstanceUID, 160)
    assert kept.PixelData == sent.PixelData
    assert not [p for p in store.tmp_dir.iterdir() if p.name.startswith("dimse-")]


def test_dicomweb_qido_then_wado_with_basic_auth(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACILITY_DICOMWEB_AUTH", f"{USER}:{PASSWORD}")
    configure(
        client, "clinic-web", dicomweb_url=pacs.dicomweb_url, dicomweb_auth_env="FACILITY_DICOMWEB_AUTH"
    )
    case_id = open_case(engine, settings, "clinic-web", accession_number=ACCESSION)
    retrieve(engine, settings)
    records = client.get(f"/v1/records/{case_id}").json()
    assert records["retrievals"][0]["status"] == "done"
    assert len(records["files"]) == 3
    clip = next(f for f in records["files"] if f["number_of_frames"] == 6)
    stored = ObjectStore.for_settings(settings).objects_dir / clip["sha256"][:2] / clip["sha256"]
    assert pydicom.dcmread(stored).NumberOfFrames == 6


def test_a_pacs_without_the_study_fails_the_retrieval_at_once(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    configure(client, "clinic-empty", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)
    case_id = open_case(engine, settings, "clinic-empty", accession_number="NO-SUCH-ACC")
    retrieve(engine, settings)
    [retrieval] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert retrieval["status"] == "failed" and "no study" in retrieval["last_error"]


def silent_listener() -> socket.socket:
    """A port that accepts TCP connections and never answers: a hung PACS."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def test_a_refusing_or_silent_pacs_is_retried_then_reported(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    hung = silent_listener()
    try:
        closed = free_port()
        configure(client, "clinic-down", ae_title="DOWN", host="127.0.0.1", port=closed)
        configure(client, "clinic-hung", ae_title="HUNG", host="127.0.0.1", port=hung.getsockname()[1])
        down = open_case(engine, settings, "clinic-down", accession_number=ACCESSION)
        silent = open_case(engine, settings, "clinic-hung", accession_number=ACCESSION)
        options = OPTIONS.model_copy(update={"retrieval_timeout_seconds": 1})
        run_due(
            engine, settings, retrieval_settings=options
        )  # first attempts, rescheduled at once (no backoff)
    finally:
        hung.close()
    for case_id in (down, silent):
        [retrieval] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
        assert (retrieval["status"], retrieval["attempts"]) == ("failed", 2)
        assert "refused or did not answer" in retrieval["last_error"]
        with Session(engine) as session:
            rows = session.exec(select(Outbox).where(Outbox.routing_key == RecordsIncomplete.TYPE)).all()
        reported = [
            RecordsIncomplete.model_validate(CloudEvent.model_validate_json(r.body).data)
            for r in rows
            if case_id.encode() in r.body
        ]
        assert any("could not be queried after 2 attempts" in w for e in reported for w in e.warnings)


def test_a_stored_dicomweb_url_that_cannot_be_called_fails_the_attempt_with_a_reason(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    """A source stored before its URL was checked: httpx.InvalidURL is no HTTPError, so it escaped the attempt,
    failed the retrieval loop every time it came due and left the partner no reason on the retrieval."""
    with Session(engine) as session:
        session.add(RecordSource(partner_id="clinic-badurl", dicomweb_url="http://[::1/dicomweb"))
        session.commit()
    case_id = open_case(engine, settings, "clinic-badurl", accession_number=ACCESSION)

    assert retrieve(engine, settings) == 2  # both attempts (no backoff here), neither raised

    [retrieval] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert (retrieval["status"], retrieval["attempts"]) == ("failed", 2)
    assert "DICOMweb URL cannot be called" in retrieval["last_error"]


def test_a_pacs_host_that_does_not_resolve_fails_the_attempt_with_a_reason(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    """A typo in the PACS's host name: the association raised socket.gaierror instead of being refused, which
    escaped the attempt and failed the retrieval loop every time the case came due."""
    configure(client, "clinic-typo", ae_title="PACS", host="pacs.clinic-typo.invalid", port=104)
    case_id = open_case(engine, settings, "clinic-typo", accession_number=ACCESSION)

    assert retrieve(engine, settings) == 2

    [retrieval] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert (retrieval["status"], retrieval["attempts"]) == ("failed", 2)
    assert "the PACS host could not be found" in retrieval["last_error"]


def test_a_cancelled_case_stops_its_retrieval(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    configure(client, "clinic-cancel", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)
    case_id = open_case(engine, settings, "clinic-cancel", accession_number=ACCESSION)
    cancelled = CaseCancelled(case_id=case_id, reason="withdrawn", cancelled_by="ops")
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=cancelled, subject=case_id), settings
        )
        session.commit()
    retrieve(engine, settings)
    records = client.get(f"/v1/records/{case_id}").json()
    assert records["retrievals"][0]["status"] == "cancelled" and records["files"] == []


def test_a_source_needs_a_pacs_or_a_dicomweb_url(client: TestClient) -> None:
    response = client.put("/v1/records/sources/clinic-x", json={"ae_title": "ONLY"})
    assert response.status_code == 422 and "dicomweb_url" in response.json()["detail"]
    bad = client.put("/v1/records/sources/clinic-x", json={"ae_title": "A", "host": "h", "port": 99999})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "port"
    assert client.get("/v1/records/sources/never-configured").status_code == 404


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"dicomweb_url": "ftp://pacs.example/dicomweb"}, "dicomweb_url"),
        ({"dicomweb_url": "http://"}, "dicomweb_url"),
        ({"dicomweb_url": "http://[::1/dicomweb"}, "dicomweb_url"),
        ({"dicomweb_url": "http://pacs.example:99999/dicomweb"}, "dicomweb_url"),
        ({"ae_title": "A", "host": "pacs.example:104", "port": 104}, "host"),
        ({"ae_title": "A", "host": "x" * 64 + ".example", "port": 104}, "host"),
        ({"ae_title": "   ", "host": "h", "port": 104}, "ae_title"),
        ({"ae_title": "A", "host": "h", "port": 104, "retrieve_method": "c-find"}, "retrieve_method"),
        (
            {"dicomweb_url": "https://pacs.example/dicomweb", "dicomweb_auth_env": "pacs password"},
            "dicomweb_auth_env",
        ),
    ],
    ids=[
        "not http",
        "no host",
        "unclosed IPv6 host",
        "port too large",
        "host with a port",
        "host label past 63",
        "blank AE title",
        "unknown method",
        "not an env var name",
    ],
)
def test_a_source_the_retrieval_cannot_use_is_refused_naming_the_field(
    client: TestClient, source: dict[str, object], field: str
) -> None:
    """The patterns were declared with SQLModel's `regex=`, which pydantic v2 ignores: "ftp://…" was taken and
    every retrieval from it failed (UnsupportedProtocol), over and over, until it gave up. A URL or a host
    that passes a pattern but cannot be called or looked up failed the retrieval loop itself."""
    partner = f"clinic-bad-{uuid.uuid4().hex[:8]}"
    response = client.put(f"/v1/records/sources/{partner}", json=source)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
    assert client.get(f"/v1/records/sources/{partner}").status_code == 404


def test_a_retrieval_left_running_by_a_dead_worker_is_taken_over(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    configure(client, "clinic-crash", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)
    case_id = open_case(engine, settings, "clinic-crash", accession_number=ACCESSION)
    with Session(engine) as session:
        row = session.exec(select(RecordRetrieval).where(RecordRetrieval.case_id == case_id)).one()
        row.status, row.attempts = RetrievalStatus.RUNNING, 1
        row.next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)  # its lease ran out
        session.add(row)
        session.commit()
    retrieve(engine, settings)
    [retrieval] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert (retrieval["status"], retrieval["attempts"]) == ("done", 2)


def test_a_planned_retrieval_starts_when_the_loop_is_woken_not_at_its_next_poll(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    """The records process wakes its retrieval loop when the consumer commits a planned retrieval (main
    wires it); the poll, here a minute, is only for retries that fall due."""
    options = RetrievalSettings(retrieval_poll_seconds=60, retrieval_timeout_seconds=10, scp_port=free_port())
    loop = RetrievalLoop(engine, settings, options)
    loop.start()
    try:
        partner = "clinic-woken"
        configure(client, partner, ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)
        case_id = open_case(engine, settings, partner, accession_number=ACCESSION)
        loop.wake()
        deadline = time.monotonic() + 20
        while (status := client.get(f"/v1/records/{case_id}").json()["retrievals"][0]["status"]) != "done":
            assert time.monotonic() < deadline, f"the woken loop did not retrieve the study ({status})"
            time.sleep(0.1)
    finally:
        loop.stop()


def test_a_pacs_administrator_can_echo_our_scp_and_a_study_with_a_key_object_is_retrieved(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, scp: StoreSCP, tmp_path: Path
) -> None:
    import subprocess

    from pydicom.dataset import FileDataset, FileMetaDataset

    echo = subprocess.run(
        ["echoscu", "-aec", "SECONDOPINION", "127.0.0.1", str(scp.port)], capture_output=True, timeout=30
    )
    assert echo.returncode == 0, echo.stderr  # C-ECHO (Verification SOP Class) is how a destination is tested

    study = f"{STUDY}.99"
    image = tmp_path / "IMAGE.dcm"
    make_us_instance(image, study_uid=study, series_uid=study + ".1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection: "key images"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    kos = FileDataset("kos", {}, file_meta=meta, preamble=b"\0" * 128)
    kos.SOPClassUID, kos.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    kos.StudyInstanceUID, kos.SeriesInstanceUID, kos.Modality = study, study + ".2", "KO"
    kos.PatientName, kos.PatientID, kos.PatientBirthDate, kos.PatientSex = "DOE^JANE", "MRN1", "19800101", "F"
    kos.save_as(tmp_path / "KOS.dcm", enforce_file_format=True)
    pacs.store(image, tmp_path / "KOS.dcm")
    configure(client, "clinic-kos", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)
    case_id = open_case(engine, settings, "clinic-kos", study_instance_uid=study)
    retrieve(engine, settings, scp)
    records = client.get(f"/v1/records/{case_id}").json()
    assert records["retrievals"][0]["status"] == "done", records["retrievals"]


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_an_unusable_instance_the_pacs_sends_is_refused_on_its_own_and_the_rest_kept(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pacs: Orthanc,
    scp: StoreSCP,
    tmp_path: Path,
    method: str,
) -> None:
    """PS3.4 B.2.3: each C-STORE sub-operation is answered for its own instance. One the import would refuse
    (here Rows and Columns declaring more pixels than it holds) was answered Success and then failed the
    whole retrieval, every usable instance with it; now it is refused as it arrives (C000 and an Error
    Comment saying why), and where the PACS goes on (C-GET: it ends with B000, one failed) the rest of the
    study is kept. Orthanc ends a C-MOVE at its first failed sub-operation: that retrieval fails, naming
    the instance refused and why."""
    study = f"{STUDY}.7{len(method)}"
    good, short = tmp_path / "GOOD.dcm", tmp_path / "SHORT.dcm"
    make_us_instance(good, study_uid=study, series_uid=study + ".1")
    dataset = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    dataset.Rows = 128
    dataset.save_as(short, enforce_file_format=True)
    pacs.store(good, short)
    partner = f"clinic-unusable-{method}"
    configure(
        client,
        partner,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
        retrieve_method=method,
    )
    case_id = open_case(engine, settings, partner, study_instance_uid=study)

    retrieve(engine, settings, scp)
    records = client.get(f"/v1/records/{case_id}").json()
    [retrieval] = records["retrievals"]
    store = ObjectStore.for_settings(settings)
    assert not [p for p in store.tmp_dir.iterdir() if p.name.startswith("dimse-")]
    if method == "c-move":
        assert (retrieval["status"], records["files"]) == ("failed", []), retrieval
        assert "after we refused an instance: retrieved instance" in retrieval["last_error"]
        assert "holds less pixel data than its Rows, Columns" in retrieval["last_error"]
        return
    assert (retrieval["status"], retrieval["attempts"]) == ("done", 1), retrieval
    assert retrieval["last_error"].startswith(
        "1 instance(s) the PACS sent were refused and not kept, 1 kept: "
    )
    assert "holds less pixel data than its Rows, Columns" in retrieval["last_error"]
    [kept] = records["files"]
    assert kept["sop_instance_uid"] == pydicom.dcmread(good).SOPInstanceUID


def test_dcmtk_storescu_learns_why_our_scp_refused_an_instance(
    settings: Settings, scp: StoreSCP, tmp_path: Path
) -> None:
    """What a PACS administrator sees (storescu -d): each refusal with a status and an Error Comment naming
    the problem, not a bare 0x0124; an instance refused leaves nothing behind, one usable is kept."""
    import subprocess

    study = f"{STUDY}.88"
    good, no_series, unsolicited = tmp_path / "GOOD.dcm", tmp_path / "NOSERIES.dcm", tmp_path / "OTHER.dcm"
    make_us_instance(good, study_uid=study, series_uid=study + ".1")
    dataset = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
    del dataset.SeriesInstanceUID
    dataset.save_as(no_series, enforce_file_format=True)
    make_us_instance(unsolicited, study_uid=study + ".9", series_uid=study + ".9.1")

    def storescu(path: Path) -> str:
        sent = subprocess.run(
            ["storescu", "-d", "-aec", "SECONDOPINION", "127.0.0.1", str(scp.port), str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return sent.stdout + sent.stderr

    answered = storescu(unsolicited)
    assert "0x0124" in answered and "[No retrieval by SECONDOPINION is waiting for this study]" in answered
    with scp.expecting(study) as writer:
        refused = storescu(no_series)
        assert "0xa900" in refused and "[Instance is DICOM without a valid SeriesInstanceUID]" in refused
        assert "DOE" not in refused  # no value from the instance in what is answered
        assert "0x0000: Success" in storescu(good)
        [kept] = writer.entries()
    sent, received = pydicom.dcmread(good), pydicom.dcmread(kept.received.path)
    assert (received.SOPInstanceUID, received.PixelData) == (sent.SOPInstanceUID, sent.PixelData)
    assert writer.refused == [
        "retrieved instance 1 is DICOM without a valid SeriesInstanceUID (a UID is digits and dots, at "
        "most 64 characters); ask the facility for an export with valid UIDs"
    ]
    store = ObjectStore.for_settings(settings)
    store.discard(kept.received)
    assert not [p for p in store.tmp_dir.iterdir() if p.name.startswith("dimse-")]


@pytest.mark.parametrize(
    ("option", "syntax"),
    [("-xb", pydicom.uid.ExplicitVRBigEndian), ("-xd", pydicom.uid.DeflatedExplicitVRLittleEndian)],
    ids=["big endian", "deflated"],
)
def test_an_old_cart_sending_big_endian_or_deflated_is_stored_as_sent_and_handed_out(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    scp: StoreSCP,
    tmp_path: Path,
    option: str,
    syntax: pydicom.uid.UID,
) -> None:
    """Older carts keep and send Explicit VR Big Endian (retired) or Deflated Explicit VR Little Endian. Our
    SCP accepted neither, so dcmtk converted on the way, and a cart that proposes nothing else could not send
    at all. Kept as sent now, in its own syntax, as an upload keeps such a file, and handed out whole."""
    import subprocess

    study = f"{STUDY}.9{ord(option[-1])}"
    path = tmp_path / "OLD.dcm"
    dataset = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=2))
    )
    dataset.file_meta.TransferSyntaxUID = syntax  # as the cart keeps it
    big = syntax == pydicom.uid.ExplicitVRBigEndian
    pydicom.dcmwrite(path, dataset, implicit_vr=False, little_endian=not big, enforce_file_format=True)
    with scp.expecting(study) as writer:
        sent = subprocess.run(
            ["storescu", "-v", option, "-aec", "SECONDOPINION", "127.0.0.1", str(scp.port), str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        [kept] = writer.entries()
    original, received = pydicom.dcmread(path), pydicom.dcmread(kept.received.path)
    assert received.file_meta.TransferSyntaxUID == syntax
    assert (received.SOPInstanceUID, received.PixelData) == (original.SOPInstanceUID, original.PixelData)

    case_id = open_case(engine, settings, "clinic-old-cart")
    with Session(engine, expire_on_commit=False) as session:
        [stored] = uploads.accept_entries(case_id, [kept], session, settings, source="c-move").files
    served = pydicom.dcmread(io.BytesIO(client.get(f"/v1/records/{case_id}/files/{stored.sha256}").content))
    assert served.file_meta.TransferSyntaxUID == syntax
    assert (served.PatientID, served.PixelData) == (f"SO-{case_id}", original.PixelData)


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_a_study_with_the_carts_raw_data_and_a_retired_class_image_is_retrieved_whole(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pacs: Orthanc,
    scp: StoreSCP,
    tmp_path: Path,
    method: str,
) -> None:
    """Ultrasound carts store vendor Raw Data (1.2.840.10008.5.1.4.1.1.66) beside the images, and older ones
    the retired Ultrasound Image Storage class. Neither had a presentation context of ours, so the PACS
    failed that sub-operation, and the retrieval with it (Orthanc: "C-GET ended with status 0xC000"), every
    attempt, then reported the PACS as one that "could not be queried". Now both arrive and are imported."""
    from pydicom.dataset import FileDataset, FileMetaDataset

    study = f"{STUDY}.6{len(method)}"
    image, retired, raw = tmp_path / "IMAGE.dcm", tmp_path / "RETIRED.dcm", tmp_path / "RAW.dcm"
    make_us_instance(image, study_uid=study, series_uid=study + ".1")
    old = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".2")))
    old.SOPClassUID = old.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    old.save_as(retired, enforce_file_format=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data Storage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    data = FileDataset("raw", {}, file_meta=meta, preamble=b"\0" * 128)
    data.SOPClassUID, data.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    data.StudyInstanceUID, data.SeriesInstanceUID, data.Modality = study, study + ".5", "US"
    data.PatientName, data.PatientID, data.PatientBirthDate, data.PatientSex = (
        "DOE^JANE",
        "MRN1",
        "19800101",
        "F",
    )
    data.save_as(raw, enforce_file_format=True)
    pacs.store(image, raw)
    if method == "c-get":  # Orthanc's own C-MOVE proposes no retired class to the destination
        # storescu proposes none either: loaded as an archive migration would load it.
        loaded = httpx.post(f"{pacs.url}/instances", content=retired.read_bytes(), auth=pacs.auth, timeout=10)
        loaded.raise_for_status()
    partner = f"clinic-raw-{method}"
    configure(
        client,
        partner,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
        retrieve_method=method,
    )
    case_id = open_case(engine, settings, partner, study_instance_uid=study)

    retrieve(engine, settings, scp)
    records = client.get(f"/v1/records/{case_id}").json()
    [retrieval] = records["retrievals"]
    assert (retrieval["status"], retrieval["attempts"], retrieval["last_error"]) == ("done", 1, None)
    with Session(engine) as session:
        kept = session.exec(select(RecordFile).where(RecordFile.case_id == case_id)).all()
    expected = ["1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.66"]
    if method == "c-get":
        expected.insert(0, "1.2.840.10008.5.1.4.1.1.6")
    assert sorted(str(f.sop_class_uid) for f in kept) == expected
