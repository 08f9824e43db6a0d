"""Our SCP as a Query/Retrieve SCP for a specialist's workstation, exercised with dcmtk's findscu, getscu and
movescu (a dcmtk storescp as the C-MOVE destination): scoped to the specialist's cases, with our identifiers
coerced as WADO-RS hands them out, unknown AEs rejected, every query and retrieve audited."""

import contextlib
import io
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.auth import audit, tenancy
from services.common import migrate
from services.common.config import Settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, dimse, workstations
from services.records.qr_scp import QueryRetrieve, QueryRetrieveSettings, Workstation
from services.records.retrieval import RetrievalSettings
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_ports
from tests.integration.test_records_dicomweb import engine, instances, new_study, open_case, serving
from tests.keys import operations_headers, specialist_headers
from tests.pki import Authority, Issued

__all__ = ["engine"]  # the records engine fixture, shared with the DICOMweb tests

SPECIALIST_A, SPECIALIST_B, SPECIALIST_C = "spec-qr-a", "spec-qr-b", "spec-qr-c"
MANY = 100  # instances in specialist C's study: more than a C-FIND may answer


@pytest.fixture(scope="module")
def auth_engine(settings: Settings) -> Engine:
    auth = make_engine("auth", settings)
    migrate.upgrade("auth", auth)
    return auth


@pytest.fixture(scope="module")
def world(engine: Engine, auth_engine: Engine, settings: Settings) -> Iterator[dict[str, object]]:
    """Three cases, one offered to each specialist, each with a released study (A's and B's: two images and a
    clip; C's: MANY images); their
    DICOMweb root; our SCP with Q/R for each specialist's workstation; a free port for a storescp."""
    ports = free_ports(("scp", "dest"))
    cases = {}
    with serving(engine, settings) as base_url:
        for specialist in (SPECIALIST_A, SPECIALIST_B, SPECIALIST_C):
            case_id = open_case(engine, settings)
            study = new_study()
            root = f"{base_url}/dicomweb/cases/{case_id}"
            sent = instances(study) if specialist != SPECIALIST_C else many(study)
            DICOMwebClient(url=root, headers=operations_headers(settings)).store_instances(sent)
            tenancy.settle_reviewer(
                auth_engine,
                case_id,
                specialist,
                lambda: tenancy.ReviewerStanding(True, "offered"),
                service="review",
            )
            cases[specialist] = (case_id, study, root)
        options = QueryRetrieveSettings(
            workstations=[
                Workstation(
                    ae_title="HOROS_A", host="127.0.0.1", role="specialist", specialist_id=SPECIALIST_A
                ),
                Workstation(
                    ae_title="HOROS_A_STORE",
                    host="127.0.0.1",
                    port=ports["dest"],
                    role="specialist",
                    specialist_id=SPECIALIST_A,
                ),
                Workstation(
                    ae_title="HOROS_B", host="127.0.0.1", role="specialist", specialist_id=SPECIALIST_B
                ),
                Workstation(
                    ae_title="HOROS_C", host="127.0.0.1", role="specialist", specialist_id=SPECIALIST_C
                ),
            ],
            max_find_matches=MANY - 10,
        )
        scp = dimse.StoreSCP(
            ObjectStore.for_settings(settings),
            ports["scp"],
            settings.max_upload_bytes,
            query_retrieve=QueryRetrieve(engine, auth_engine, settings, options),
        )
        scp.start()
        try:
            yield {"cases": cases, "scp": ports["scp"], "dest": ports["dest"]}
        finally:
            scp.stop()


def many(study: str) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1")))
        for _ in range(MANY)
    ]


def dcmtk(tool: str, aet: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-aet", aet, "-aec", "SECONDOPINION", "-S", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def find(aet: str, port: int, out: Path, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(exist_ok=True)
    done = dcmtk("findscu", aet, port, "-X", "-od", str(out), *[a for k in keys for a in ("-k", k)])
    assert done.returncode == 0, done.stderr
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    for p in out.glob("rsp*.dcm"):
        p.unlink()
    return answers


def qr_entries(auth_engine: Engine, case_id: str) -> list[audit.AuditEvent]:
    return [e for e in audit.entries(auth_engine, case_id=case_id) if e.resource == "records.dicom-qr"]


def test_a_workstation_finds_its_specialists_study_at_each_level_with_wildcards_and_ranges(
    world: dict, auth_engine: Engine, tmp_path: Path
) -> None:
    port, (case_a, study_a, _), (case_b, _, _) = (
        world["scp"],
        world["cases"][SPECIALIST_A],
        world["cases"][SPECIALIST_B],
    )
    [study] = find(
        "HOROS_A",
        port,
        tmp_path,
        "QueryRetrieveLevel=STUDY",
        "PatientID=SO-*",
        "PatientName=DOE^J*",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
    )
    assert study.StudyInstanceUID == study_a  # specialist B's case stays unseen; returned though not asked
    assert study.PatientName == "DOE^JANE"
    assert study.PatientID == f"SO-{case_a}"  # our identifier, not the facility's MRN
    assert study.NumberOfStudyRelatedInstances == 3 and study.ModalitiesInStudy == "US"
    assert find("HOROS_B", port, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_a}") == []
    assert find("HOROS_A", port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=MRN1") == []
    assert find("HOROS_A", port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=ROE*") == []
    # Names match regardless of case, as typed into a workstation's search (PS3.4 allows it for PN only).
    for typed in ("doe^j*", "Doe^Jane"):
        [found] = find("HOROS_A", port, tmp_path, "QueryRetrieveLevel=STUDY", f"PatientName={typed}")
        assert found.StudyInstanceUID == study_a, typed
    assert find("HOROS_A", port, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=19000101-19010101") == []
    [series] = find(
        "HOROS_A",
        port,
        tmp_path,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study_a}",
        "SeriesInstanceUID",
        "Modality=U?",
        "NumberOfSeriesRelatedInstances",
    )
    assert series.SeriesInstanceUID == study_a + ".1" and series.NumberOfSeriesRelatedInstances == 3
    lower = ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_a}", "Modality=us")
    assert find("HOROS_A", port, tmp_path, *lower) == []  # other keys match case-sensitively
    images = find(
        "HOROS_A",
        port,
        tmp_path,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study_a}",
        f"SeriesInstanceUID={study_a}.1",
        "SOPInstanceUID",
        "NumberOfFrames=4",
    )
    assert len(images) == 1 and images[0].NumberOfFrames == 4
    [entry] = [e for e in qr_entries(auth_engine, case_a) if "C-FIND STUDY" in e.detail][:1]
    assert entry.actor == "dicom-ae:HOROS_A" and entry.outcome == "success" and study_a in entry.detail
    assert not [e for e in qr_entries(auth_engine, case_b) if e.actor == "dicom-ae:HOROS_A"]


def test_more_matches_than_the_limit_end_with_out_of_resources(world: dict) -> None:
    study_c = world["cases"][SPECIALIST_C][1]
    ae = AE(ae_title="HOROS_C")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", world["scp"], ae_title="SECONDOPINION")
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_c
    query.SOPInstanceUID = ""
    try:
        statuses = [
            int(s.Status) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
        query.QueryRetrieveLevel = "PATIENT"
        [(bad, _)] = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert statuses == [0xFF00] * (MANY - 10) + [0xA700]  # no more than the limit, then refused
    assert bad.Status == 0xA900


def test_getscu_receives_the_instances_as_wado_rs_hands_them_out(
    world: dict, auth_engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    case_a, study_a, root = world["cases"][SPECIALIST_A]
    done = dcmtk(
        "getscu",
        "HOROS_A",
        world["scp"],
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_a}",
    )
    assert done.returncode == 0, done.stderr
    received = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p) for p in tmp_path.iterdir())}
    assert len(received) == 3
    client = DICOMwebClient(url=root, headers=operations_headers(settings))
    for uid, got in received.items():
        wado = client.retrieve_instance(study_a, study_a + ".1", uid)
        assert got.PatientID == wado.PatientID == f"SO-{case_a}"
        assert got.AccessionNumber == wado.AccessionNumber
        assert got.PixelData == wado.PixelData
        assert got.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientID == "MRN1"
    read = [e for e in qr_entries(auth_engine, case_a) if "C-GET" in e.detail]
    assert {uid for uid in received if any(uid in e.detail for e in read)} == set(received)


def test_getscu_of_another_specialists_study_receives_nothing(world: dict, tmp_path: Path) -> None:
    study_b = world["cases"][SPECIALIST_B][1]
    dcmtk(
        "getscu",
        "HOROS_A",
        world["scp"],
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_b}",
    )
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def storescp(
    port: int, out: Path, ae_title: str = "HOROS_A_STORE", tls: tuple[str, ...] = ()
) -> Iterator[None]:
    """dcmtk's storescp as a workstation's C-STORE SCP (over TLS with `tls`: its +tls and +cf options)."""
    process = subprocess.Popen(
        ["storescp", "-aet", ae_title, *tls, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(
            ["echoscu", "-aec", ae_title, *tls, "127.0.0.1", str(port)], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_movescu_sends_only_to_a_configured_destination_of_the_same_specialist(
    world: dict, auth_engine: Engine, tmp_path: Path
) -> None:
    study_a = world["cases"][SPECIALIST_A][1]
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_a}"]
    with storescp(world["dest"], tmp_path):
        moved = dcmtk("movescu", "HOROS_A", world["scp"], "-aem", "HOROS_A_STORE", *keys)
        assert moved.returncode == 0, moved.stderr
        assert len(list(tmp_path.glob("*"))) == 3
        # B's workstation may not send A's study anywhere, nor A's to an address it names.
        other = dcmtk("movescu", "HOROS_B", world["scp"], "-aem", "HOROS_A_STORE", *keys)
        unknown = dcmtk("movescu", "HOROS_A", world["scp"], "-aem", "ELSEWHERE", *keys)
    assert "MoveDestinationUnknown" in other.stderr + other.stdout
    assert "MoveDestinationUnknown" in unknown.stderr + unknown.stdout
    refusals = [
        e.detail
        for e in audit.entries(auth_engine, limit=100_000)
        if e.resource == "records.dicom-qr" and e.outcome == "denied" and e.detail.startswith("C-MOVE")
    ]
    assert any("'ELSEWHERE'" in r for r in refusals) and any("'HOROS_A_STORE'" in r for r in refusals)
    assert len(list(tmp_path.glob("*"))) == 3


def test_an_unknown_calling_ae_is_rejected_and_audited(
    world: dict, auth_engine: Engine, tmp_path: Path
) -> None:
    done = dcmtk("findscu", "STRANGER", world["scp"], "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=*")
    assert done.returncode != 0 and "Calling AE Title Not Recognized" in done.stderr
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", world["scp"], ae_title="SECONDOPINION")
    assert assoc.is_rejected  # A-ASSOCIATE-RJ: calling AE title not recognised
    denied = [
        e
        for e in audit.entries(auth_engine, limit=100_000)
        if e.actor == "dicom-ae:STRANGER" and e.resource == "records.dicom-qr"
    ]
    assert denied and denied[-1].outcome == "denied"


def test_patient_root_finds_the_case_as_a_patient_under_our_patient_id(world: dict, tmp_path: Path) -> None:
    case_a, study_a, _ = world["cases"][SPECIALIST_A]
    out = tmp_path / "find"
    out.mkdir()
    done = subprocess.run(
        ["findscu", "-aet", "HOROS_A", "-aec", "SECONDOPINION", "-P", "-X", "-od", str(out)]
        + ["-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=SO-*", "-k", "NumberOfPatientRelatedStudies"]
        + ["127.0.0.1", str(world["scp"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [patient] = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
    assert patient.PatientID == f"SO-{case_a}" and patient.NumberOfPatientRelatedStudies == 1
    got = subprocess.run(
        ["getscu", "-aet", "HOROS_A", "-aec", "SECONDOPINION", "-P", "-od", str(tmp_path)]
        + ["-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID=SO-{case_a}"]
        + ["127.0.0.1", str(world["scp"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert {pydicom.dcmread(p).StudyInstanceUID for p in tmp_path.glob("*") if p.is_file()} == {study_a}


def test_a_cancelled_find_stops_and_a_retrieve_without_its_unique_key_fails(
    world: dict, tmp_path: Path
) -> None:
    study_c = world["cases"][SPECIALIST_C][1]
    cancelled = dcmtk(
        "findscu",
        "HOROS_C",
        world["scp"],
        "--cancel",
        "1",
        "-v",
        "-X",
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={study_c}",
        "-k",
        "SOPInstanceUID",
    )
    assert cancelled.returncode == 0, cancelled.stderr
    assert "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in cancelled.stderr
    assert len(list(tmp_path.glob("rsp*.dcm"))) < MANY - 10
    study_a = world["cases"][SPECIALIST_A][1]
    ae = AE(ae_title="HOROS_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", world["scp"], ae_title="SECONDOPINION")
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_a
    try:
        [(status, _)] = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "SeriesInstanceUID" in status.ErrorComment


def move_over_tls(port: int, study: str, client: Issued, ca: Path) -> int:
    """A C-MOVE of `study` to HOROS_TLS_STORE by HOROS_TLS over TLS (dcmtk's movescu has no TLS): its status."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    ae = AE(ae_title="HOROS_TLS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="SECONDOPINION", tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        responses = list(
            assoc.send_c_move(query, "HOROS_TLS_STORE", StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    return int(responses[-1][0].Status)


def test_a_tls_workstation_is_served_only_on_the_tls_port_with_its_own_certificate_and_moved_to_over_tls(
    world: dict, engine: Engine, auth_engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    hospital = Authority(tmp_path, "hospital")
    ours, horos, other = (
        hospital.issue("secondopinion", server=True, also_client=True),  # a C-MOVE's client too
        hospital.issue("horos-jdoe", server=True, also_client=True),  # its storescp is a TLS server
        hospital.issue("someone-else"),
    )
    ports = free_ports(("tls", "plain", "dest"))
    tls = RetrievalSettings(
        scp_tls_port=ports["tls"],
        scp_tls_cert_path=ours.cert,
        scp_tls_key_path=ours.key,
        scp_tls_client_ca_path=hospital.cert,
    )
    station = Workstation(
        ae_title="HOROS_TLS",
        host="127.0.0.1",
        tls=True,
        certificate_cn="horos-jdoe",
        role="specialist",
        specialist_id=SPECIALIST_A,
    )
    its_scp = station.model_copy(update={"ae_title": "HOROS_TLS_STORE", "port": ports["dest"]})
    scp = dimse.StoreSCP(
        ObjectStore.for_settings(settings),
        ports["plain"],
        settings.max_upload_bytes,
        tls_port=tls.scp_tls_port,
        ssl_context=tls.scp_tls_context(),
        query_retrieve=QueryRetrieve(
            engine,
            auth_engine,
            settings,
            QueryRetrieveSettings(workstations=[station, its_scp]),
            tls.scp_tls_client(),
        ),
    )
    scp.start()
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    study_a = world["cases"][SPECIALIST_A][1]
    horos_tls = ("+tls", str(horos.key), str(horos.cert), "+cf", str(hospital.cert))
    moved_to = tmp_path / "moved"
    moved_to.mkdir()
    try:
        plain = dcmtk("findscu", "HOROS_TLS", scp.port, *keys)
        wrong = dcmtk(
            "findscu", "HOROS_TLS", int(str(scp.tls_port)), "+tls", str(other.key), str(other.cert),
            "+cf", str(hospital.cert), *keys,
        )  # fmt: skip
        right = dcmtk(
            "findscu", "HOROS_TLS", int(str(scp.tls_port)), "+tls", str(horos.key), str(horos.cert),
            "+cf", str(hospital.cert), "-X", "-od", str(tmp_path), *keys,
        )  # fmt: skip
        with storescp(ports["dest"], moved_to, "HOROS_TLS_STORE", horos_tls):
            moved = move_over_tls(ports["tls"], study_a, horos, hospital.cert)
    finally:
        scp.stop()
    assert moved == 0x0000
    assert len(list(moved_to.iterdir())) == 3
    assert "Calling AE Title Not Recognized" in plain.stderr
    assert "Calling AE Title Not Recognized" in wrong.stderr
    assert right.returncode == 0, right.stderr
    [study] = [pydicom.dcmread(p) for p in tmp_path.glob("rsp*.dcm")]
    assert study.StudyInstanceUID == study_a


def test_operations_configure_a_workstation_without_a_restart_and_remove_it(
    world: dict, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app("records", routers=[workstations.router], engine=lambda: engine)
    app.dependency_overrides[api.get_session] = session
    binding = {"host": "127.0.0.1", "role": "specialist", "specialist_id": SPECIALIST_B}
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    with TestClient(app, headers=operations_headers(settings)) as client:
        url = "/v1/records/workstations/RADIANT_B"
        assert client.get(url).status_code == 404
        refused = dcmtk("findscu", "RADIANT_B", world["scp"], *keys)
        assert "Calling AE Title Not Recognized" in refused.stderr
        by_name = client.put(url, json={**binding, "host": "radiant.example.org"})
        assert by_name.status_code == 422 and "IP address" in by_name.text
        unbound = client.put(url, json={**binding, "specialist_id": None})
        assert unbound.status_code == 422 and "specialist_id" in unbound.text
        specialist = client.put(url, json=binding, headers=specialist_headers(settings, SPECIALIST_B))
        assert specialist.status_code == 403
        put = client.put(url, json=binding)
        assert put.status_code == 200 and put.json()["ae_title"] == "RADIANT_B"
        assert client.get(url).json()["specialist_id"] == SPECIALIST_B
        [study] = find("RADIANT_B", world["scp"], tmp_path, *[k for k in keys if k != "-k"])
        assert study.StudyInstanceUID == world["cases"][SPECIALIST_B][1]
        assert client.delete(url).status_code == 204
        gone = dcmtk("findscu", "RADIANT_B", world["scp"], *keys)
    assert "Calling AE Title Not Recognized" in gone.stderr
