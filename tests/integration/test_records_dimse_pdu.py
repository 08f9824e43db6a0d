"""The PDU size records asks a PACS for. A PACS sends P-DATA no larger than the requestor's "maximum length
received"; pynetdicom's requestor says 16 KiB unless told otherwise, which made a 500 MB C-GET from Orthanc
take 61,000 socket writes instead of 7,700 and twice as long as dcmtk's getscu (make bench retrieve).

The PACS here is a pynetdicom Query/Retrieve SCP on loopback (Orthanc does not say what PDU size a peer
asked for): it records what each association asked for and the largest P-DATA it sent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    UltrasoundMultiFrameImageStorage,
)

from services.common.config import Settings
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records import dimse
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_port

STUDY = "1.2.826.0.1.3680043.10.7101"


class Pacs:
    """A Query/Retrieve SCP holding one clip; notes each association's requested PDU size and the largest
    P-DATA PDU it sent."""

    def __init__(self, clip: Path) -> None:
        self.clip = clip
        self.asked_for: list[int] = []
        self.implementations: list[tuple[str, str | None]] = []  # each requestor's class UID and version name
        self.largest_sent = 0
        self.port = free_port()
        self.ae = AE(ae_title="TESTPACS")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        self.ae.add_supported_context(UltrasoundMultiFrameImageStorage, scu_role=True, scp_role=True)
        self.ae.maximum_pdu_size = 0  # no limit of its own: it sends what the requestor asked for

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_PDU_SENT, self._sent),
            (evt.EVT_C_FIND, self._find),
            (evt.EVT_C_GET, self._get),
        ]
        self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        self.ae.shutdown()

    def _requested(self, event: Any) -> None:
        self.asked_for.append(event.assoc.requestor.maximum_length)
        requestor = event.assoc.requestor
        self.implementations.append(
            (requestor.implementation_class_uid, requestor.implementation_version_name)
        )

    def _sent(self, event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            self.largest_sent = max(self.largest_sent, len(event.pdu.encode()))

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        found = Dataset()
        found.QueryRetrieveLevel = "STUDY"
        found.StudyInstanceUID = STUDY
        yield 0xFF00, found

    def _get(self, event: Any) -> Iterator[Any]:
        yield 1
        yield 0xFF00, pydicom.dcmread(self.clip)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    clip = tmp_path / "CLIP.dcm"
    make_us_instance(clip, study_uid=STUDY, series_uid=STUDY + ".1", frames=40, rows=256, cols=256)
    pacs = Pacs(clip)
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


def test_c_find_and_c_get_ask_the_pacs_for_128_kib_pdus(pacs: Pacs, settings: Settings) -> None:
    source = dimse.DimseSource("TESTPACS", "127.0.0.1", pacs.port, timeout=10)
    store = ObjectStore.for_settings(settings)

    assert dimse.find_studies(source, dimse.StudyQuery(study_uid=STUDY)) == [STUDY]
    [entry] = dimse.get_study(source, STUDY, store, limit=settings.max_upload_bytes).entries

    assert pacs.asked_for == [dimse.MAX_PDU_BYTES, dimse.MAX_PDU_BYTES]
    # A PACS's association log names us, not the toolkit we are built with (the conformance statement's 10).
    assert pacs.implementations == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)] * 2
    # The 2.6 MB clip came in PDUs of 128 KiB (and their 6-byte header), not 16 KiB ones.
    assert pacs.largest_sent == dimse.MAX_PDU_BYTES + 6
    sent = pydicom.dcmread(pacs.clip)
    kept = pydicom.dcmread(entry.received.path)
    assert kept.PixelData == sent.PixelData
    assert entry.received.sha256 == hashlib.sha256(entry.received.path.read_bytes()).hexdigest()
    entry.received.path.unlink()
