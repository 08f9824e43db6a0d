"""DIMSE query/retrieve from a facility's PACS as AE `SECONDOPINION`: C-FIND, then C-GET or C-MOVE.

C-MOVE sends the study to our C-STORE SCP (`StoreSCP`, started by the records process); C-GET receives it
on the same association. Either way each instance is written straight to the store's temp area.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from services.records.archive import Entry
from services.records.store import ObjectStore

OUR_AE = "SECONDOPINION"
RETRIEVED_CLASSES = (
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    SecondaryCaptureImageStorage,
    EncapsulatedPDFStorage,
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
)
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)
NOT_AUTHORIZED, OUT_OF_RESOURCES = 0x0124, 0xA700


class PacsUnavailable(Exception):
    """The PACS refused the association, did not answer in time, or failed the operation: retried."""


@dataclass(frozen=True)
class DimseSource:
    ae_title: str
    host: str
    port: int
    timeout: float = 30.0


# The largest PDU we accept (pynetdicom's default is 16 KiB): each PDU costs Python work of its own, so a
# PACS allowed larger ones costs us less per study. Bounded, because a PDU is read whole into memory.
MAX_PDU_BYTES = 131072


def _ae(timeout: float) -> AE:
    ae = AE(ae_title=OUR_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = MAX_PDU_BYTES
    return ae


def _write_instance(store: ObjectStore, preamble: bytes, dataset: bytes, position: int, limit: int) -> Entry:
    """A received C-STORE as a PS3.10 file in the temp area (the dataset bytes are written as received)."""
    incoming = store.incoming(position=position, total=position, limit=limit)
    try:
        incoming.write(preamble)
        incoming.write(dataset)
    except BaseException:
        incoming.abort()
        raise
    return Entry(incoming.finish(), None, f"retrieved instance {position}", declared_type="application/dicom")


def _received(event: Any) -> tuple[bytes, bytes]:
    """A C-STORE's PS3.10 preamble with its file meta, and its dataset bytes as they came."""
    meta = DicomBytesIO()
    write_file_meta_info(meta, event.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue(), event.request.DataSet.getvalue()


class InstanceWriter:
    """Writes received instances to disk on a thread of its own: the C-STORE is answered as soon as the
    instance is in memory, so the PACS sends the next one while the disk takes this one (instead of
    idling through every fsync). At most `depth` instances wait in memory; none is indexed before
    `entries()` has seen every write finish, and a failed write fails the retrieval, which is retried."""

    def __init__(self, store: ObjectStore, limit: int, depth: int = 1) -> None:
        self._store, self._limit = store, limit
        self._slots = threading.BoundedSemaphore(depth)
        self._lock = threading.Lock()
        self._writes: list[Future[Entry]] = []

    def write(self, event: Any) -> None:
        preamble, dataset = _received(event)
        self._slots.acquire()
        with self._lock:
            position = len(self._writes) + 1
            write = _writers.submit(_write_instance, self._store, preamble, dataset, position, self._limit)
            self._writes.append(write)
        write.add_done_callback(lambda _: self._slots.release())

    def entries(self) -> list[Entry]:
        """Every instance written (waiting for the last writes); on a failed write none is kept."""
        with self._lock:
            writes = list(self._writes)
        wait(writes)
        failed = next((w.exception() for w in writes if w.exception() is not None), None)
        if failed is not None:
            self.discard()
            raise PacsUnavailable(
                f"a retrieved instance could not be stored ({type(failed).__name__}); the retrieval is retried"
            )
        return [w.result() for w in writes]

    def discard(self) -> None:
        with self._lock:
            writes = list(self._writes)
        wait(writes)
        _discard(self._store, [w.result() for w in writes if w.exception() is None])


_writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dimse-write")


@dataclass(frozen=True)
class StudyQuery:
    """Which study to find: by UID, by accession, or by the facility's patient id and study date."""

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD

    def keys(self) -> dict[str, str]:
        """Matching keys (DICOM keywords) for C-FIND and QIDO-RS."""
        if self.study_uid:
            return {"StudyInstanceUID": self.study_uid}
        if self.accession:
            return {"AccessionNumber": self.accession}
        return {
            "PatientID": self.patient_id or "",
            "StudyDate": self.study_date or "",
            "ModalitiesInStudy": "US",
        }


def find_studies(source: DimseSource, wanted: StudyQuery) -> list[str]:
    """C-FIND at STUDY level with the query's matching keys; the Study Instance UIDs found."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    for keyword, value in wanted.keys().items():
        setattr(query, keyword, value)
    ae = _ae(source.timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise PacsUnavailable("the PACS refused or did not answer the association for C-FIND")
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.get("Status", -1)) if status else -1
            if code in PENDING and identifier is not None:
                found.append(str(identifier.get("StudyInstanceUID") or ""))
            elif code != SUCCESS:
                raise PacsUnavailable(
                    f"C-FIND ended with status 0x{code & 0xFFFF:04X}" if code >= 0 else "C-FIND timed out"
                )
    finally:
        assoc.release()
    return [uid for uid in found if uid]


def get_study(source: DimseSource, study_uid: str, store: ObjectStore, *, limit: int) -> list[Entry]:
    """C-GET the study; its instances arrive as C-STORE sub-operations on our association."""
    writer = InstanceWriter(store, limit)

    def on_store(event: Any) -> int:
        writer.write(event)
        return SUCCESS

    ae = _ae(source.timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in RETRIEVED_CLASSES:
        ae.add_requested_context(sop_class)
    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_CLASSES]
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise PacsUnavailable("the PACS refused or did not answer the association for C-GET")
    try:
        _run_retrieve(
            assoc.send_c_get(_study_query(study_uid), StudyRootQueryRetrieveInformationModelGet), "C-GET"
        )
    except BaseException:
        writer.discard()
        raise
    finally:
        assoc.release()
    return writer.entries()


def move_study(source: DimseSource, study_uid: str, scp: StoreSCP) -> list[Entry]:
    """C-MOVE the study to our SCP (AE SECONDOPINION); the instances it received for that study."""
    ae = _ae(source.timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with scp.expecting(study_uid) as writer:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
        if not assoc.is_established:
            raise PacsUnavailable("the PACS refused or did not answer the association for C-MOVE")
        try:
            _run_retrieve(
                assoc.send_c_move(
                    _study_query(study_uid), OUR_AE, StudyRootQueryRetrieveInformationModelMove
                ),
                "C-MOVE",
            )
        finally:
            assoc.release()
        return writer.entries()


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _run_retrieve(responses: Any, operation: str) -> None:
    for status, _ in responses:
        code = int(status.get("Status", -1)) if status else -1
        if code in PENDING:
            continue
        if code != SUCCESS:
            failed = int(status.get("NumberOfFailedSuboperations", 0)) if status else 0
            raise PacsUnavailable(
                f"{operation} timed out"
                if code < 0
                else f"{operation} ended with status 0x{code:04X} ({failed} failed)"
            )


def _discard(store: ObjectStore, entries: list[Entry]) -> None:
    for entry in entries:
        store.discard(entry.received)


@dataclass
class StoreSCP:
    """Our C-STORE SCP: accepts instances only for a study a C-MOVE of ours is waiting for."""

    store: ObjectStore
    port: int
    limit: int
    host: str = "127.0.0.1"
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting: dict[str, InstanceWriter] = field(default_factory=dict)
    _server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=OUR_AE)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        for sop_class in RETRIEVED_CLASSES:
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def expecting(self, study_uid: str) -> _Expectation:
        return _Expectation(self, study_uid)

    def _on_store(self, event: Any) -> int:
        study_uid = str(event.dataset.get("StudyInstanceUID") or "")
        with self._lock:
            writer = self._waiting.get(study_uid)
        if writer is None:
            return NOT_AUTHORIZED  # nobody asked for this study: we accept no unsolicited images
        try:
            writer.write(event)
        except Exception:
            return OUT_OF_RESOURCES
        return SUCCESS


class _Expectation:
    def __init__(self, scp: StoreSCP, study_uid: str) -> None:
        self._scp, self._study_uid = scp, study_uid

    def __enter__(self) -> InstanceWriter:
        writer = InstanceWriter(self._scp.store, self._scp.limit)
        with self._scp._lock:
            self._scp._waiting[self._study_uid] = writer
        return writer

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        with self._scp._lock:
            writer = self._scp._waiting.pop(self._study_uid, None)
        if exc_type is not None and writer is not None:
            writer.discard()
