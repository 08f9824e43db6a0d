"""An Orthanc PACS for tests, playing the referring facility's PACS: its own JSON config in a tmp dir,
loopback HTTP and DICOM ports chosen free, the DICOMweb plugin on, our AE `SECONDOPINION` listed as a
modality (for C-MOVE), basic auth with a user the fixture sets. Studies are loaded with dcmtk `storescu`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.infra import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "FACILITYPACS"
USER, PASSWORD = "records-test", "not-a-secret"


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's DICOM TLS (1.9+): its DICOM port speaks only TLS, with this certificate and key; peers'
    certificates are checked against `trusted` (PEM bundle), and required when `client_required`."""

    cert: Path
    key: Path
    trusted: Path
    client_required: bool = True


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int
    ae_title: str = AE_TITLE
    tls: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (USER, PASSWORD)

    def store(self, *files: Path) -> None:
        """Load instances as a modality would: dcmtk storescu over DIMSE (its REST API when its DICOM port
        speaks TLS)."""
        if self.tls:
            for path in files:
                posted = httpx.post(f"{self.url}/instances", content=path.read_bytes(), auth=self.auth)
                posted.raise_for_status()
            return
        subprocess.run(
            [
                "storescu",
                "-aec",
                self.ae_title,
                "-aet",
                "MODALITY",
                "127.0.0.1",
                str(self.dicom_port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def studies(self) -> list[str]:
        response = httpx.get(f"{self.url}/studies", auth=self.auth, timeout=10)
        response.raise_for_status()
        return list(response.json())


@contextmanager
def running_orthanc(
    workdir: Path,
    *,
    scp_port: int,
    maximum_pdu_length: int = 16384,
    transcode: bool = True,
    tls: OrthancTls | None = None,
    ae_title: str = AE_TITLE,
    lua: str | None = None,
) -> Iterator[Orthanc]:
    """Start Orthanc with a config written into `workdir`; our AE SECONDOPINION is at 127.0.0.1:`scp_port`.
        `maximum_pdu_length` is the largest PDU it sends and accepts (Orthanc allows 4096 to 131072).
        `transcode=False`: Orthanc sends each instance in the transfer syntax it was stored in, as many PACS do,
        instead of transcoding it to one the peer proposed (its `TranscodeDicomProtocol`). With `tls`, its DICOM
        port speaks DICOM TLS, and it reaches our AE (`scp_port`, C-MOVE) over TLS too. `ae_title`: its own AE title
    (one no other test's image source names); `lua`: a Lua script it runs (its callbacks, e.g. filters)."""
    if not Path(ORTHANC).exists() or shutil.which("storescu") is None:
        raise RuntimeError("Orthanc (/usr/sbin/Orthanc) and dcmtk (storescu) are needed for these tests")
    orthanc = Orthanc(http_port=free_port(), dicom_port=free_port(), ae_title=ae_title, tls=tls is not None)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "facility-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": orthanc.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": True,
        "DicomAet": orthanc.ae_title,
        "DicomPort": orthanc.dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {"secondopinion": ["SECONDOPINION", "127.0.0.1", scp_port]},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "MaximumPduLength": maximum_pdu_length,
        "TranscodeDicomProtocol": transcode,
        "StableAge": 1,
        "HttpTimeout": 10,
    }
    if tls is not None:
        config["DicomModalities"] = {
            "secondopinion": {
                "AET": "SECONDOPINION",
                "Host": "127.0.0.1",
                "Port": scp_port,
                "UseDicomTls": True,
            }
        }
        config |= {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls.cert),
            "DicomTlsPrivateKey": str(tls.key),
            "DicomTlsTrustedCertificates": str(tls.trusted),
            "DicomTlsRemoteCertificateRequired": tls.client_required,
        }
    if lua is not None:
        script = workdir / "orthanc.lua"
        script.write_text(lua)
        config["LuaScripts"] = [str(script)]
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {workdir / 'orthanc.log'}")
            try:
                if httpx.get(f"{orthanc.url}/system", auth=orthanc.auth, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not answer within 30 s")
            time.sleep(0.2)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
