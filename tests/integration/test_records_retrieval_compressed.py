"""A PACS that keeps its ultrasound compressed and does not transcode (Orthanc with TranscodeDicomProtocol
off, as many archives are): our C-GET must offer and accept the compressed transfer syntaxes (and the retired
Explicit VR Big Endian and Deflated Explicit VR Little Endian that old carts wrote), and our C-MOVE
destination accept them, or the PACS has no way to send the study at all. What arrives is kept as sent, byte for byte, in its own syntax."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from services.common.config import Settings
from services.records.dimse import StoreSCP
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.integration import test_records_retrieval as retrieval
from tests.orthanc import Orthanc, running_orthanc

STUDY = "1.2.826.0.1.3680043.10.7002"
engine, client, scp = retrieval.engine, retrieval.client, retrieval.scp  # records, its API, its SCP
# dcmtk's compressors, as a facility's modality or archive would have written these files.
COMPRESSORS = {
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],  # JPEG baseline (lossy 8 bit): the usual US and cine syntax
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    RLELossless: ["dcmcrle"],
    # Not compressed, but as old carts write them and some archives keep them: sent as kept, too.
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compressed")
    files = {}
    for index, (syntax, command) in enumerate(COMPRESSORS.items()):
        plain, packed = folder / f"plain{index}.dcm", folder / f"IM{index}.dcm"
        study = f"{STUDY}.{index}"
        make_us_instance(plain, study_uid=study, series_uid=study + ".1", frames=3 if index == 0 else 1)
        subprocess.run([*command, str(plain), str(packed)], check=True, capture_output=True, timeout=60)
        assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
        files[syntax] = packed
    return files


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, scp: StoreSCP, compressed: dict[str, Path]
) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), scp_port=scp.port, transcode=False) as orthanc:
        for path in compressed.values():  # over REST: storescu would propose (and send) them uncompressed
            response = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=orthanc.auth)
            response.raise_for_status()
        yield orthanc


@pytest.mark.parametrize("method", ["c-get", "c-move"])
@pytest.mark.parametrize("syntax", list(COMPRESSORS), ids=[s.name for s in COMPRESSORS])
def test_a_compressed_study_arrives_as_the_pacs_keeps_it(
    client,
    engine,
    settings: Settings,
    pacs: Orthanc,
    scp: StoreSCP,
    compressed: dict[str, Path],
    syntax: str,
    method: str,
) -> None:  # type: ignore[no-untyped-def]
    sent = pydicom.dcmread(compressed[syntax])
    partner = f"clinic-compressed-{method}-{syntax}"
    retrieval.configure(
        client,
        partner,
        ae_title=pacs.ae_title,
        host="127.0.0.1",
        port=pacs.dicom_port,
        retrieve_method=method,
    )
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=sent.StudyInstanceUID)

    retrieval.retrieve(engine, settings, scp)
    records = client.get(f"/v1/records/{case_id}").json()
    assert records["retrievals"][0]["status"] == "done", records["retrievals"]
    [stored] = records["files"]
    path = ObjectStore.for_settings(settings).objects_dir / stored["sha256"][:2] / stored["sha256"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == stored["sha256"]
    kept = pydicom.dcmread(path)
    assert kept.file_meta.TransferSyntaxUID == syntax  # not transcoded on the way, by either side
    assert kept.SOPInstanceUID == sent.SOPInstanceUID
    assert kept.PixelData == sent.PixelData  # the compressed fragments as the PACS held them
