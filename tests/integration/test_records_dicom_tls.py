"""DICOM over TLS (PS3.15 Annex B) with real peers: an Orthanc playing the facility's PACS with its own DICOM
TLS (mutual TLS required) answers our C-FIND, C-GET and C-MOVE (to our TLS SCP) and takes the report back;
dcmtk storescu reaches our TLS SCP with a trusted client certificate and is refused without one. A
handshake that fails is recorded saying which side refused and why."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from services.common.config import Settings, get_settings
from services.records import report_return
from services.records.dimse import StoreSCP
from services.records.retrieval import RetrievalLoop, RetrievalSettings, get_retrieval_settings, run_due
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_port
from tests.integration import test_records_report_return as returns
from tests.integration import test_records_retrieval as retrieval
from tests.orthanc import Orthanc, OrthancTls, running_orthanc
from tests.pki import Authority, Issued

engine, client = retrieval.engine, retrieval.client  # the records service and its API, as fixtures
STUDY = "1.2.826.0.1.3680043.10.7300"
OPTIONS = RetrievalSettings(retrieval_attempts=1, retrieval_backoff_seconds=0, retrieval_timeout_seconds=5)


@dataclass(frozen=True)
class Pki:
    hospital: Authority  # signs the PACS's certificate and ours: what each side trusts
    rogue: Authority  # trusted by no one
    pacs: Issued
    ours: Issued
    stranger: Issued  # a client certificate the rogue CA signed


@pytest.fixture(scope="module")
def pki(settings: Settings) -> Pki:
    """Certificates where the records service reads TLS files from (RECORDS_DICOM_TLS_DIR's default)."""
    folder = settings.data_dir / "records" / "dicom-tls" / "hospital-a"
    folder.mkdir(parents=True, exist_ok=True)
    hospital, rogue = Authority(folder, "hospital"), Authority(folder, "rogue")
    return Pki(
        hospital,
        rogue,
        hospital.issue(
            "pacs", server=True, also_client=True
        ),  # Orthanc presents it for C-MOVE's C-STOREs too
        hospital.issue("secondopinion", server=True, also_client=True),
        rogue.issue("stranger"),
    )


@pytest.fixture(scope="module")
def tls_scp(settings: Settings, pki: Pki) -> Iterator[StoreSCP]:
    """Our SCP over TLS only, requiring a client certificate the hospital CA signed."""
    options = RetrievalSettings(
        scp_tls_port=free_port(),
        scp_tls_cert_path=pki.ours.cert,
        scp_tls_key_path=pki.ours.key,
        scp_tls_client_ca_path=pki.hospital.cert,
    )
    scp = StoreSCP(
        ObjectStore.for_settings(settings),
        free_port(),
        settings.max_upload_bytes,
        tls_port=options.scp_tls_port,
        ssl_context=options.scp_tls_context(),
        plain=False,
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory: pytest.TempPathFactory, pki: Pki, tls_scp: StoreSCP) -> Iterator[Orthanc]:
    workdir = tmp_path_factory.mktemp("orthanc-tls")
    files = []
    for index in range(2):
        path = workdir / f"IM{index}.dcm"
        make_us_instance(path, study_uid=STUDY, series_uid=STUDY + ".1")
        files.append(path)
    tls = OrthancTls(pki.pacs.cert, pki.pacs.key, pki.hospital.cert)
    with running_orthanc(workdir, scp_port=int(tls_scp.tls_port or 0), tls=tls) as orthanc:
        orthanc.store(*files)
        yield orthanc


@pytest.fixture(scope="module")
def plain_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A PACS that speaks plain DIMSE only (no study in it: the handshake is what is tried)."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc-plain"), scp_port=free_port()) as orthanc:
        yield orthanc


def tls_source(pacs: Orthanc, pki: Pki, **overrides: object) -> dict[str, object]:
    """The source as a partner gives it: paths relative to the records service's DICOM TLS directory."""
    return {
        "ae_title": pacs.ae_title,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "tls": True,
        "tls_ca_path": f"hospital-a/{pki.hospital.cert.name}",
        "tls_cert_path": f"hospital-a/{pki.ours.cert.name}",
        "tls_key_path": f"hospital-a/{pki.ours.key.name}",
        **overrides,
    }


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_c_find_then_c_get_or_c_move_over_mutual_tls_imports_the_study(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pki: Pki,
    tls_pacs: Orthanc,
    tls_scp: StoreSCP,
    method: str,
) -> None:
    partner = f"clinic-tls-{method}"
    retrieval.configure(client, partner, **tls_source(tls_pacs, pki), retrieve_method=method)
    assert client.get(f"/v1/records/sources/{partner}").json()["tls"] is True
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=STUDY)

    run_due(engine, settings, scp=tls_scp, retrieval_settings=OPTIONS)
    records = client.get(f"/v1/records/{case_id}").json()
    [done] = records["retrievals"]
    assert (done["status"], done["study_instance_uid"], done["last_error"]) == ("done", STUDY, None)
    assert len(records["files"]) == 2


def test_the_report_goes_back_into_the_pacs_over_tls(
    client: TestClient, engine: Engine, settings: Settings, pki: Pki, tls_pacs: Orthanc
) -> None:
    study = STUDY + ".5"
    case_id = returns.returning_case(
        client, engine, settings, "clinic-tls-return", study, **tls_source(tls_pacs, pki)
    )
    report, pdf = returns.report_for(case_id, study)
    returns.deliver(engine, settings, report)
    assert report_return.run_due(engine, settings, returns.OPTIONS) == 1
    assert returns.pdf_in_pacs(tls_pacs, study, report.sop_instance_uid) == pdf
    [sent] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert (sent["status"], sent["last_error"]) == ("done", None)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (
            {"tls_cert_path": None, "tls_key_path": None},
            "the PACS refused us: it requires a client certificate",
        ),
        (
            {"tls_ca_path": "ROGUE_CA"},
            "we refused the PACS's certificate: not trusted by the CA bundle configured",
        ),
        ({"tls_server_name": "pacs.example.org"}, "we refused the PACS's certificate: it does not name"),
        (
            {"tls_cert_path": "STRANGER_CERT", "tls_key_path": "STRANGER_KEY"},
            "the PACS refused our client certificate",
        ),
    ],
    ids=["no client certificate", "untrusted PACS", "name mismatch", "untrusted client"],
)
def test_a_refused_handshake_is_recorded_saying_which_side_refused_and_why(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pki: Pki,
    tls_pacs: Orthanc,
    overrides: dict[str, str | None],
    why: str,
) -> None:
    named = {"ROGUE_CA": pki.rogue.cert, "STRANGER_CERT": pki.stranger.cert, "STRANGER_KEY": pki.stranger.key}
    overrides = {k: str(named[v]) if v in named else v for k, v in overrides.items()}
    partner = f"clinic-tls-refused-{len(why)}"
    retrieval.configure(client, partner, **tls_source(tls_pacs, pki, **overrides))
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=STUDY)

    run_due(engine, settings, retrieval_settings=OPTIONS)
    [failed] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert failed["status"] == "failed"
    assert failed["last_error"].startswith(f"DICOM TLS to the PACS failed: {why}"), failed["last_error"]
    assert "Doe" not in failed["last_error"] and "MRN1" not in failed["last_error"]


@pytest.mark.parametrize("mismatch", ["plain to a tls pacs", "tls to a plain pacs"])
def test_plain_dimse_to_a_tls_pacs_or_tls_to_a_plain_one_is_recorded_saying_what_to_set(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pki: Pki,
    tls_pacs: Orthanc,
    plain_pacs: Orthanc,
    mismatch: str,
) -> None:
    if mismatch == "plain to a tls pacs":
        source: dict[str, object] = {
            "ae_title": tls_pacs.ae_title,
            "host": "127.0.0.1",
            "port": tls_pacs.dicom_port,
        }
        why = "the PACS answered with TLS: set tls on the image source"
    else:
        source, why = (
            tls_source(plain_pacs, pki),
            "the PACS does not speak TLS on this port: check the port or turn tls off",
        )
    partner = f"clinic-tls-mismatch-{len(why)}"
    retrieval.configure(client, partner, **source)
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=STUDY)

    run_due(engine, settings, retrieval_settings=OPTIONS)
    [failed] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert failed["status"] == "failed"
    assert why in failed["last_error"], failed["last_error"]
    assert "Doe" not in failed["last_error"] and "MRN1" not in failed["last_error"]


def test_a_report_returned_in_plain_dimse_to_a_tls_pacs_records_that_tls_is_to_be_set(
    client: TestClient, engine: Engine, settings: Settings, tls_pacs: Orthanc
) -> None:
    study = STUDY + ".6"
    plain = {"ae_title": tls_pacs.ae_title, "host": "127.0.0.1", "port": tls_pacs.dicom_port}
    case_id = returns.returning_case(client, engine, settings, "clinic-tls-return-plain", study, **plain)
    returns.deliver(engine, settings, returns.report_for(case_id, study)[0])
    assert report_return.run_due(engine, settings, returns.OPTIONS) == 1
    [waiting] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert waiting["status"] == "pending"
    assert "the PACS answered with TLS: set tls on the image source" in waiting["last_error"]
    # Its last attempt fails it with the same advice (and leaves no return due for the modules after this one).
    assert report_return.run_due(engine, settings, returns.OPTIONS) == 1
    [failed] = client.get(f"/v1/records/{case_id}").json()["report_returns"]
    assert failed["status"] == "failed"
    assert "the PACS answered with TLS: set tls on the image source" in failed["last_error"]


def storescu(scp: StoreSCP, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", *tls, "-aec", "SECONDOPINION", "127.0.0.1", str(scp.tls_port), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_dcmtk_storescu_with_a_trusted_certificate_stores_over_tls_and_one_without_is_refused(
    settings: Settings, pki: Pki, tls_scp: StoreSCP, tmp_path: Path
) -> None:
    study = STUDY + ".7"
    image = tmp_path / "IMAGE.dcm"
    make_us_instance(image, study_uid=study, series_uid=study + ".1")
    trusted = ("+tls", str(pki.pacs.key), str(pki.pacs.cert), "+cf", str(pki.hospital.cert))
    with tls_scp.expecting(study) as writer:
        with capture_logs() as logs:
            stranger = storescu(
                tls_scp,
                image,
                "+tls",
                str(pki.stranger.key),
                str(pki.stranger.cert),
                "+cf",
                str(pki.hospital.cert),
            )
            anonymous = storescu(tls_scp, image, "+tla", "+cf", str(pki.hospital.cert))
            # The SCP's thread logs a refusal as it closes the association, which may be after storescu has
            # exited: wait for both (a loaded CI run left this block before the second was logged).
            deadline = time.monotonic() + 10
            while (
                sum(e["event"] == "records.scp_tls_refused" for e in logs) < 2 and time.monotonic() < deadline
            ):
                time.sleep(0.05)
        sent = storescu(tls_scp, image, *trusted)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        [kept] = writer.entries()
    received = pydicom.dcmread(kept.received.path)
    assert received.SOPInstanceUID == pydicom.dcmread(image).SOPInstanceUID
    ObjectStore.for_settings(settings).discard(kept.received)
    for refused in (stranger, anonymous):
        assert refused.returncode != 0
        assert "Association Request Failed" in refused.stderr
    reasons = [entry["reason"] for entry in logs if entry["event"] == "records.scp_tls_refused"]
    assert any("does not trust" in r or "not trusted" in r for r in reasons), reasons
    assert any("presented no certificate" in r for r in reasons), reasons


def test_a_plain_client_is_not_served_on_the_tls_port(pki: Pki, tls_scp: StoreSCP, tmp_path: Path) -> None:
    image = tmp_path / "IMAGE.dcm"
    make_us_instance(image, study_uid=STUDY + ".8", series_uid=STUDY + ".8.1")
    assert storescu(tls_scp, image).returncode != 0


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ({"tls_ca_path": None}, "tls_ca_path is required with tls"),
        ({"tls_ca_path": "hospital-a/nonexistent.pem"}, "nonexistent.pem does not exist"),
        (
            {"tls_ca_path": "/etc/ssl/certs/ca-certificates.crt"},
            "must name a file in the records service's DICOM",
        ),
        ({"tls_key_path": "../../../../../etc/shadow"}, "must name a file in the records service's DICOM"),
        ({"tls_key_path": None}, "tls_cert_path and tls_key_path go together"),
        ({"tls_ca_path": "KEY"}, "holds no PEM certificate"),
        ({"tls_key_path": "CA"}, "could not be loaded together"),
        ({"tls": False}, "tls_* settings are given but tls is false"),
        ({"tls_server_name": "pacs example"}, "is neither a host name nor an IP address"),
    ],
    ids=[
        "no ca",
        "missing ca",
        "ca outside the directory",
        "key outside the directory",
        "cert without key",
        "ca not a certificate",
        "key not a key",
        "tls off",
        "server name not a name",
    ],
)
def test_a_tls_source_whose_files_cannot_be_used_is_refused_at_configuration(
    client: TestClient, pki: Pki, source: dict[str, object], problem: str
) -> None:
    named = {"KEY": str(pki.ours.key), "CA": str(pki.hospital.cert)}
    source = {k: named.get(str(v), v) for k, v in source.items()}
    body = tls_source(Orthanc(1, 2762), pki, **source)
    response = client.put("/v1/records/sources/clinic-tls-bad", json=body)
    assert response.status_code == 422, response.text
    assert problem in response.text
    assert "BEGIN" not in response.text  # no key or certificate content in what is answered


def test_in_production_plain_dimse_to_another_machine_is_refused_unless_a_vpn_is_declared(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    pki: Pki,
    tls_pacs: Orthanc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote = {"ae_title": "REMOTEPACS", "host": "10.20.30.40", "port": 104}
    retrieval.configure(client, "clinic-plain-remote", **remote)  # configured before production
    case_id = retrieval.open_case(engine, settings, "clinic-plain-remote", study_instance_uid=STUDY)
    production = settings.model_copy(update={"env": "prod"})
    client.app.dependency_overrides[get_settings] = lambda: production  # type: ignore[attr-defined]
    try:
        refused = client.put("/v1/records/sources/clinic-plain-remote", json=remote)
        assert refused.status_code == 422
        assert "plain DIMSE to a PACS on another machine is refused in production" in refused.text
        # Loopback and TLS are not refused.
        assert (
            client.put("/v1/records/sources/clinic-tls-prod", json=tls_source(tls_pacs, pki)).status_code
            == 200
        )
        run_due(engine, production, retrieval_settings=OPTIONS)
        [failed] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
        assert (failed["status"], failed["attempts"]) == ("failed", 1)
        assert "RECORDS_DIMSE_PLAIN_PROTECTED" in failed["last_error"]

        monkeypatch.setenv("RECORDS_DIMSE_PLAIN_PROTECTED", "true")
        get_retrieval_settings.cache_clear()
        assert client.put("/v1/records/sources/clinic-plain-remote", json=remote).status_code == 200
    finally:
        client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
        get_retrieval_settings.cache_clear()


def test_a_client_that_never_finishes_its_handshake_holds_up_no_other(pki: Pki, tls_scp: StoreSCP) -> None:
    """The handshake runs on each association's own thread: a peer that connects and says nothing (a port
    scanner, a half-open link) does not stop the next PACS from being served."""
    silent = socket.create_connection(("127.0.0.1", int(tls_scp.tls_port or 0)))
    try:
        echo = subprocess.run(
            ["echoscu", "+tls", str(pki.pacs.key), str(pki.pacs.cert), "+cf", str(pki.hospital.cert)]
            + ["-to", "5", "-aec", "SECONDOPINION", "127.0.0.1", str(tls_scp.tls_port)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        silent.close()
    assert echo.returncode == 0, echo.stderr


def test_the_records_process_serves_its_scp_over_tls_from_its_settings(
    engine: Engine, settings: Settings, pki: Pki
) -> None:
    options = OPTIONS.model_copy(
        update={
            "scp_port": free_port(),
            "scp_plain": False,
            "scp_tls_port": free_port(),
            "scp_tls_cert_path": pki.ours.cert,
            "scp_tls_key_path": pki.ours.key,
        }
    )
    loop = RetrievalLoop(engine, settings, options)
    loop.start()
    try:
        tls = ["+tls", str(pki.pacs.key), str(pki.pacs.cert), "+cf", str(pki.hospital.cert)]
        for args, port, answered in ((tls, options.scp_tls_port, 0), ([], options.scp_port, 1)):
            echo = subprocess.run(
                ["echoscu", *args, "-aec", "SECONDOPINION", "127.0.0.1", str(port)],
                capture_output=True,
                timeout=10,
            )
            assert (echo.returncode != 0) == bool(answered), echo.stderr  # TLS answers, plain is off
    finally:
        loop.stop()
