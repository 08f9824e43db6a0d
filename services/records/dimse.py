"""DIMSE query/retrieve from a facility's PACS as AE `SECONDOPINION`: C-FIND, then C-GET or C-MOVE.

C-MOVE sends the study to our C-STORE SCP (`StoreSCP`, started by the records process); C-GET receives it
on the same association. Either way each instance is spooled to the store's temp area as its fragments
arrive (`SpooledInstance`), never held whole in memory. Each instance's header is read as soon as it is
all in: one the import would refuse is answered with a C-STORE failure (A900, C000) and an Error Comment
saying what is wrong, and removed, while the rest of the study is kept (`InstanceWriter.refused` says why).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_role, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    EnhancedUSVolumeStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RawDataStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
    VideoPhotographicImageStorage,
)
from pynetdicom.transport import AssociationSocket

from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records import dicom_tls
from services.records import storage_commitment as stgcmt
from services.records.archive import Entry
from services.records.classify import (
    DicomHeader,
    HeaderReader,
    Unusability,
    Unusable,
    read_dicom_header,
)
from services.records.store import HEAD_BYTES, FileTooLarge, ObjectStore, ReceivedFile

OUR_AE = "SECONDOPINION"
# The retired Ultrasound (Multi-frame) Image Storage classes, which older carts wrote and archives still hold.
RETIRED_ULTRASOUND_CLASSES = (UID("1.2.840.10008.5.1.4.1.1.6"), UID("1.2.840.10008.5.1.4.1.1.3"))
# Images as ultrasound carts and PACS keep them: mostly JPEG (cine too), some RLE, JPEG 2000 or MPEG video.
IMAGE_CLASSES = (
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    EnhancedUSVolumeStorage,
    SecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    VideoPhotographicImageStorage,
    *RETIRED_ULTRASOUND_CLASSES,
)
# What C-GET proposes (it must name each class it receives, in at most 128 presentation contexts): the
# images, and what else an ultrasound study holds, such as the cart vendor's Raw Data. A PACS fails the
# sub-operation of an instance of a class not named, and the whole C-GET with it; our C-STORE SCP (C-MOVE)
# takes every storage class.
RETRIEVED_CLASSES = (
    *IMAGE_CLASSES,
    RawDataStorage,
    KeyObjectSelectionDocumentStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    EncapsulatedPDFStorage,
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
)
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# The retired Explicit VR Big Endian and Deflated Explicit VR Little Endian, which older carts send (and some
# archives keep): without them such a cart could not send at all, and a PACS that does not transcode failed
# the sub-operation. Kept as received, in that syntax, as an upload keeps such a file; handed out the same
# (rewrite.py). C-GET proposes each in a context of its own (a PACS accepts one syntax per context).
OLD_UNCOMPRESSED = [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
COMPRESSED = [
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
    JPEG2000Lossless,
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
]
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)
NOT_AUTHORIZED, OUT_OF_RESOURCES = 0x0124, 0xA700
# C-STORE failures (PS3.4 Table B.2-1) for an instance that is not usable, by what is wrong with it.
DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0xA900, 0xC000
REFUSED_AS = {
    Unusability.UNREADABLE: CANNOT_UNDERSTAND,
    Unusability.INCOMPLETE: DOES_NOT_MATCH_SOP_CLASS,
    Unusability.TOO_LARGE: OUT_OF_RESOURCES,
}
# A C-MOVE or C-GET whose failed sub-operations were all instances we refused is kept (what was usable).
SOME_FAILED, ALL_FAILED = 0xB000, 0xA702


class PacsUnavailable(Exception):
    """The PACS refused the association, did not answer in time, or failed the operation: retried."""


@dataclass(frozen=True)
class DimseSource:
    ae_title: str
    host: str
    port: int
    timeout: float = 30.0
    tls: dicom_tls.ClientTls | None = None


# The largest PDU we accept (pynetdicom's default is 16 KiB): each PDU costs Python work of its own, so a
# PACS allowed larger ones costs us less per study. Bounded, because a PDU is read whole into memory.
# `ae.maximum_pdu_size` only covers associations we accept (the C-MOVE SCP); on those we request, the
# PACS learns it from `associate(max_pdu=...)`, which `_associate` passes. Without it Orthanc sent a
# 500 MB C-GET in 16 KiB PDUs, 8 KiB writes, and the retrieval took twice as long as dcmtk's getscu.
MAX_PDU_BYTES = 131072

# pynetdicom dumps each C-FIND request and response identifier (PatientID, PatientName, dates: PHI) at INFO;
# the logging setup quiets its logger too, this keeps them out at any level.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def _our_ae() -> AE:
    """An AE titled OUR_AE that names our implementation (not pynetdicom's) in what it requests and accepts."""
    ae = AE(ae_title=OUR_AE)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


def _ae(timeout: float) -> AE:
    _spool_received_datasets()
    ae = _our_ae()
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = MAX_PDU_BYTES
    return ae


def _associate(ae: AE, source: DimseSource, **kwargs: Any) -> Association:
    """Request an association with the PACS, asking it for PDUs of up to MAX_PDU_BYTES (every association
    we request goes through here, so none falls back to pynetdicom's 16 KiB). Over TLS when the source says
    so; a TLS handshake that failed is raised saying which side refused and why."""
    try:
        context = source.tls.context() if source.tls is not None else None
    except dicom_tls.TlsFilesUnusable as exc:
        raise PacsUnavailable(f"DICOM TLS to the PACS cannot start: {exc}") from None
    if context is not None and source.tls is not None:
        kwargs["tls_args"] = (context, source.tls.server_name or source.host)
    started = time.monotonic()
    try:
        assoc = ae.associate(
            source.host, source.port, ae_title=source.ae_title, max_pdu=MAX_PDU_BYTES, **kwargs
        )
    except (OSError, UnicodeError) as exc:
        # A host name that does not resolve (socket.gaierror) or cannot be encoded (idna): raised, not an
        # association refused, so it escaped every caller's handling and failed the retrieval loop instead.
        raise PacsUnavailable(f"the PACS host could not be found ({type(exc).__name__})") from None
    refused = dicom_tls.failure(context)
    if not assoc.is_established and refused is not None:
        raise PacsUnavailable(
            f"DICOM TLS to the PACS failed: {dicom_tls.describe(refused, we_are_client=True)}"
        )
    if not assoc.is_established and context is None and _answers_tls(assoc, source, started):
        raise PacsUnavailable(
            "DICOM to the PACS failed: the PACS answered with TLS: set tls on the image source "
            "(with tls_ca_path, and our client certificate if it wants one), or use its plain DICOM port"
        )
    return assoc


def _answers_tls(assoc: Association, source: DimseSource, started: float) -> bool:
    """Whether a plain association that failed did so because the port speaks only TLS: asked of a PACS that
    neither rejected it (A-ASSOCIATE-RJ: it speaks DICOM) nor stayed silent until our timeout (a hung PACS is
    not asked again), with a TLS ClientHello of its own."""
    if assoc.is_rejected or time.monotonic() - started >= source.timeout:
        return False
    return dicom_tls.answers_tls(source.host, source.port, min(source.timeout, 5.0))


# The thread that receives the P-DATA only collects fragments; every this many bytes it hands them to a
# spooling thread, which writes them (one write) and hashes them on the other core. One hand-off per
# batch, not per fragment: per 128 KiB fragment, a hand-off or a write costs the receiving thread more
# than the copy it saves.
SPOOL_BATCH_BYTES = 8 * 1024 * 1024
_batch_buffers = threading.local()  # each spooling thread's buffer for a batch (SPOOL_BATCH_BYTES and a bit)
_spoolers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dimse-spool")


class SpooledInstance:
    """A received C-STORE's dataset, written to the store's temp area fragment by fragment as it arrives.

    pynetdicom (with `STORE_RECV_CHUNKED_DATASET`) writes a dataset it receives into a NamedTemporaryFile
    as its P-DATA fragments come in; on our associations it gets one of these instead (it uses `write`,
    `file.flush`, `name` and `close`). At most one batch of an instance is held in memory: the DUL thread
    only collects fragments, and every `SPOOL_BATCH_BYTES` a spooling thread writes the batch, hashes it
    and starts its writeback. When the last fragment is in, what is left is the last batch and one fsync
    (`finish`, on the writer's thread). A write that fails (the size limit, a full
    disk) stops the spooling; the C-STORE is refused when it completes (`take` raises)."""

    def __init__(self, directory: Path, position: int, limit: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._fd, self.name = tempfile.mkstemp(dir=directory, prefix="dimse-", suffix=".part")
        self._path = Path(self.name)
        self.file = self  # pynetdicom calls `file.flush()` after each fragment
        self._position, self._limit = position, limit
        self._digest = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._spooling: Future[None] | None = None
        self._size, self._head = 0, b""
        self._error: Exception | None = None
        self._lock = threading.Lock()
        self._taken = False

    def write(self, data: bytes) -> int:
        if self._error is not None:
            return len(data)
        self._size += len(data)
        if self._size > self._limit:
            self._fail(FileTooLarge(self._position, self._position, self._limit))
            return len(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= SPOOL_BATCH_BYTES:
            self._hand_off()
        return len(data)

    def _hand_off(self) -> None:
        """Give the fragments so far to the spooling thread, to write (one writev) and hash; one batch at a
        time, in order. A failed batch fails the instance."""
        try:
            self._settled()
        except Exception as exc:
            self._fail(exc)
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._spooling = _spoolers.submit(_write_batch, self._fd, self._digest, batch)

    def _settled(self) -> None:
        if self._spooling is not None:
            spooling, self._spooling = self._spooling, None
            spooling.result()

    def make_readable(self) -> None:
        """Everything received so far in the file (to read its header before taking it)."""
        self._hand_off()
        with contextlib.suppress(Exception):
            self._settled()

    def _fail(self, exc: Exception) -> None:
        """Stop spooling and remove the file (once a batch being written has finished with it)."""
        self._error = exc
        self._batch = []
        with contextlib.suppress(Exception):
            self._settled()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        self._path.unlink(missing_ok=True)

    @property
    def failed(self) -> bool:
        """Spooling stopped (the size limit, a full disk): `take` raises why."""
        return self._error is not None

    def flush(self) -> None:
        """Nothing per fragment: fragments are written a batch at a time, and made durable by `finish`."""

    def close(self) -> None:
        """Nothing: a taken file is finished by the writer; one never taken is removed by `discard`."""

    def take(self) -> None:
        """Take the complete file over from pynetdicom. It is renamed first: after a C-STORE SCP's handler
        returns, pynetdicom unlinks the file by the name it gave it."""
        with self._lock:
            if self._taken:
                raise RuntimeError("this instance was already taken or discarded")
            self._taken = True
        if self._error is not None:
            raise self._error
        self._path = Path(self.name + ".taken")  # `name` stays what pynetdicom knows, and now names nothing
        os.rename(self.name, self._path)

    def finish(self) -> ReceivedFile:
        """The file made durable: the last batch written and hashed, then fsynced and closed."""
        try:
            self._hand_off()
            self._settled()
            if self._error is not None:
                raise self._error
            os.fsync(self._fd)
            fd, self._fd = self._fd, -1
            os.close(fd)
        except BaseException:
            self._fail(RuntimeError("finishing failed"))
            raise
        return ReceivedFile(
            self._position, self._path, self._digest.hexdigest(), self._size, self._head, utf8_text=False
        )

    def discard(self) -> None:
        """Remove a file that was never taken (refused, or its association ended mid-instance)."""
        with self._lock:
            if self._taken:
                return
            self._taken = True
        self._fail(RuntimeError("discarded"))


def _write_batch(fd: int, digest: Any, batch: list[bytes]) -> None:
    """Write a batch of fragments at the file's end, hash them, and start writing them out to disk.

    The fragments are first gathered into this thread's buffer so that the write and the hash are one
    call each: every such call lets go of the GIL and must win it back from the DUL thread, which keeps it
    for up to the switch interval, and one hash call per 128 KiB fragment spent longer waiting for the GIL
    than hashing (py-spy of the retrieve benchmark)."""
    size = sum(len(data) for data in batch)
    buffer: bytearray | None = getattr(_batch_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _batch_buffers.buffer = bytearray(max(size, SPOOL_BATCH_BYTES + 256 * 1024))
    view = memoryview(buffer)
    at = 0
    for data in batch:
        view[at : at + len(data)] = data
        at += len(data)
    gathered = view[:at]
    while gathered:
        gathered = gathered[os.write(fd, gathered) :]
    digest.update(view[:at])
    with contextlib.suppress(OSError):  # start the writeback now: the fsync at the end finds little left
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _finished(spooled: SpooledInstance, position: int, header: DicomHeader | None) -> Entry:
    return Entry(
        spooled.finish(),
        None,
        f"retrieved instance {position}",
        declared_type="application/dicom",
        header=header,
    )


@dataclass
class _Spool:
    """Where an association's received datasets go."""

    store: ObjectStore
    limit: int
    opened: list[SpooledInstance] = field(default_factory=list)

    def open(self) -> SpooledInstance:
        spooled = SpooledInstance(self.store.tmp_dir, len(self.opened) + 1, self.limit)
        self.opened.append(spooled)
        return spooled

    def discard_untaken(self) -> None:
        for spooled in self.opened:
            spooled.discard()


# The DUL thread of each of our associations (it decodes the incoming P-DATA) -> its spool.
_spools: dict[threading.Thread, _Spool] = {}
_spools_lock = threading.Lock()


def _spooled_or_temporary(*args: Any, **kwargs: Any) -> Any:
    """Stands in for pynetdicom's NamedTemporaryFile: a spooled instance on our associations, pynetdicom's
    own temporary file on any other (nothing else in this process is expected to receive C-STOREs)."""
    with _spools_lock:
        spool = _spools.get(threading.current_thread())
    if spool is None:
        return NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes and removes it
    return spool.open()


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """`AssociationSocket.recv` reading straight into one buffer (pynetdicom reads 4 KiB at a time, each
    read a new bytes object appended to the last: for a 128 KiB PDU, 32 reads and copies instead of 1).
    Same contract: `nr_bytes` bytes, or fewer if the peer closed the connection."""
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(nr_bytes)
    with memoryview(buffer) as view:
        read = 0
        while read < nr_bytes:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                break
            read += got
    if read < nr_bytes:
        del buffer[read:]
    return buffer


def _spool_received_datasets() -> None:
    """Received C-STORE datasets go to disk as they arrive, not into memory; PDUs are read whole."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spooled_or_temporary
    AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]


def _open_spool(dul: threading.Thread, store: ObjectStore, limit: int) -> None:
    """Spool what arrives on the association whose DUL thread (it decodes the incoming P-DATA) is `dul`."""
    with _spools_lock:
        _spools[dul] = _Spool(store, limit)


def _close_spool(dul: threading.Thread) -> None:
    """The association has ended: remove what it left unfinished."""
    with _spools_lock:
        spool = _spools.pop(dul, None)
    if spool is not None:
        spool.discard_untaken()


@contextmanager
def _spooling(dul: threading.Thread, store: ObjectStore, limit: int) -> Iterator[None]:
    _open_spool(dul, store, limit)
    try:
        yield
    finally:
        _close_spool(dul)


def _differs_from_request(header: DicomHeader, request: Any) -> str | None:
    """What in the data set disagrees with the C-STORE request carrying it (PS3.4 B.2.3: the SOP Class
    UID and SOP Instance UID must be the Affected ones), or None."""
    affected_class = str(getattr(request, "AffectedSOPClassUID", None) or "")
    affected_instance = str(getattr(request, "AffectedSOPInstanceUID", None) or "")
    if affected_class and header.sop_class_uid != affected_class:
        return "has another SOP Class UID than its C-STORE request"
    if affected_instance and header.sop_instance_uid != affected_instance:
        return "has another SOP Instance UID than its C-STORE request"
    return None


def store_failure(status: int, comment: str) -> Dataset:
    """A C-STORE response's status with an Error Comment (LO: at most 64 characters; never a value from
    the instance, only what is wrong with it)."""
    comment = comment.split(" (")[0].split(";")[0]
    if len(comment) > 64:
        comment = comment[:61].rsplit(" ", 1)[0] + "..."
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment
    return answer


class InstanceWriter:
    """Finishes received instances on a thread of its own: the C-STORE is answered as soon as the
    instance is all in (spooled to disk as it arrived), so the PACS sends the next one while this one's
    last hash and fsync run; up to `depth` may be finishing at once. None is indexed before `entries()`
    has seen every instance finish, and a failed one fails the retrieval, which is retried."""

    def __init__(
        self, store: ObjectStore, depth: int = 2, read_header: HeaderReader = read_dicom_header
    ) -> None:
        self._store = store
        self._read_header = read_header
        self._slots = threading.BoundedSemaphore(depth)
        self._lock = threading.Lock()
        self._writes: list[Future[Entry]] = []
        self._arrived = 0
        self.refused: list[str] = []  # why each unusable instance was refused ("retrieved instance 3 ...")

    def write(self, event: Any) -> int | Dataset:
        """Take a received instance: SUCCESS; a failure status with an Error Comment for one whose header
        is not usable (it is removed, the others are kept); or OUT_OF_RESOURCES for one that could not be
        taken (that failure is kept, and fails the retrieval)."""
        spooled = getattr(event.request, "_dataset_file", None)
        with self._lock:
            self._arrived += 1
            position = self._arrived
        try:
            if not isinstance(spooled, SpooledInstance):
                raise RuntimeError("an instance arrived on an association without a spool")
            checked = self._check(spooled, position, event.request)
            if isinstance(checked, Dataset):
                return checked
            spooled.take()
        except Exception as exc:
            failed: Future[Entry] = Future()
            failed.set_exception(exc)
            with self._lock:
                self._writes.append(failed)
            return OUT_OF_RESOURCES
        self._slots.acquire()
        with self._lock:
            future = _writers.submit(_finished, spooled, position, checked)
            self._writes.append(future)
        future.add_done_callback(lambda _: self._slots.release())
        return SUCCESS

    def _check(self, spooled: SpooledInstance, position: int, request: Any) -> Dataset | DicomHeader | None:
        """The C-STORE failure for an instance whose header the import would refuse, or whose SOP Class or
        Instance UID is not the one the C-STORE request names (read now, so the PACS learns which instance
        and why, and the rest of the study is kept); for a usable one its header, which the import takes as
        read here instead of reading the file again; None when spooling failed (`take` says why)."""
        if spooled.failed:
            return None  # `take` says why
        spooled.make_readable()
        try:
            header = self._read_header(Path(spooled.name))
            problem, status = _differs_from_request(header, request), DOES_NOT_MATCH_SOP_CLASS
        except Unusable as exc:
            problem, status = str(exc), REFUSED_AS[exc.kind]
        except Exception:
            problem, status = "is not a readable DICOM instance", CANNOT_UNDERSTAND
        if problem is None:
            return header
        spooled.discard()
        with self._lock:
            self.refused.append(f"retrieved instance {position} {problem}")
        return store_failure(status, f"Instance {problem}")

    def failure(self) -> PacsUnavailable | None:
        """Why the retrieval cannot be kept, once every instance has finished: the first that failed."""
        with self._lock:
            writes = list(self._writes)
        wait(writes)
        failed = next((w.exception() for w in writes if w.exception() is not None), None)
        if failed is None:
            return None
        return PacsUnavailable(
            f"a retrieved instance could not be stored ({type(failed).__name__}); the retrieval is retried"
        )

    def entries(self) -> list[Entry]:
        """Every instance written (waiting for the last ones); on a failed one none is kept."""
        failure = self.failure()
        if failure is not None:
            self.discard()
            raise failure
        return [w.result() for w in self._writes]

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
    assoc = _associate(ae, source)
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


@dataclass(frozen=True)
class Retrieved:
    """What a C-GET or C-MOVE brought: the instances kept, and why each one refused was refused."""

    entries: list[Entry]
    refused: list[str]


def get_study(
    source: DimseSource,
    study_uid: str,
    store: ObjectStore,
    *,
    limit: int,
    read_header: HeaderReader = read_dicom_header,
) -> Retrieved:
    """C-GET the study; its instances arrive as C-STORE sub-operations on our association, each spooled
    to the store's temp area as it arrives; one whose header is not usable is refused on its own."""
    writer = InstanceWriter(store, read_header=read_header)
    ae = _ae(source.timeout)
    add_get_contexts(ae)
    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_CLASSES]
    assoc = _associate(ae, source, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, writer.write)])
    if not assoc.is_established:
        raise PacsUnavailable("the PACS refused or did not answer the association for C-GET")
    with _spooling(assoc.dul, store, limit):
        try:
            _run_retrieve(
                assoc.send_c_get(_study_query(study_uid), StudyRootQueryRetrieveInformationModelGet),
                "C-GET",
                writer,
            )
        finally:
            assoc.release()
    return Retrieved(writer.entries(), writer.refused)


def add_get_contexts(ae: AE) -> None:
    """What our C-GET proposes: the Q/R GET model, and each retrieved class in the syntaxes we keep (the
    conformance statement renders these)."""
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in RETRIEVED_CLASSES:
        ae.add_requested_context(sop_class, UNCOMPRESSED)
        for syntax in OLD_UNCOMPRESSED:
            ae.add_requested_context(sop_class, syntax)
    for sop_class in IMAGE_CLASSES:  # one context per compressed syntax: the PACS accepts one per context
        for syntax in COMPRESSED:
            ae.add_requested_context(sop_class, syntax)


def move_study(source: DimseSource, study_uid: str, scp: StoreSCP) -> Retrieved:
    """C-MOVE the study to our SCP (AE SECONDOPINION); the instances it received for that study."""
    ae = _ae(source.timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with scp.expecting(study_uid) as writer:
        assoc = _associate(ae, source)
        if not assoc.is_established:
            raise PacsUnavailable("the PACS refused or did not answer the association for C-MOVE")
        try:
            _run_retrieve(
                assoc.send_c_move(
                    _study_query(study_uid), OUR_AE, StudyRootQueryRetrieveInformationModelMove
                ),
                "C-MOVE",
                writer,
            )
        finally:
            assoc.release()
        return Retrieved(writer.entries(), writer.refused)


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _run_retrieve(responses: Any, operation: str, writer: InstanceWriter) -> None:
    """Follow the C-GET/C-MOVE to its final status; on a failure nothing received is kept."""
    try:
        for status, _ in responses:
            code = int(status.get("Status", -1)) if status else -1
            if code in PENDING:
                continue
            failed = int(status.get("NumberOfFailedSuboperations", 0)) if status else 0
            if code in (SOME_FAILED, ALL_FAILED) and 0 < failed <= len(writer.refused):
                continue  # the sub-operations that failed are the instances we refused
            if code != SUCCESS:
                raise PacsUnavailable(
                    f"{operation} timed out"
                    if code < 0
                    else f"{operation} ended with status 0x{code:04X} ({failed} failed)"
                )
    except BaseException as exc:
        failure = writer.failure()  # an instance we could not store says better why sub-operations failed
        writer.discard()
        if failure is not None and isinstance(exc, PacsUnavailable):
            raise failure from exc
        if writer.refused and isinstance(exc, PacsUnavailable):
            # Some PACS (Orthanc) end a C-MOVE at its first failed sub-operation: say which instance.
            raise PacsUnavailable(f"{exc} after we refused an instance: {writer.refused[0]}") from exc
        raise


def _discard(store: ObjectStore, entries: list[Entry]) -> None:
    for entry in entries:
        store.discard(entry.received)


@dataclass(frozen=True)
class CommitmentHandlers:
    """What our SCP does with DICOM Storage Commitment: a facility's PACS asking us to commit what it sent
    (N-ACTION), and a PACS's result for a report we asked it to commit (N-EVENT-REPORT); each returns the
    DIMSE status and the reply dataset (None)."""

    on_request: Callable[[Any], tuple[int, Dataset | None]]
    on_result: Callable[[Any], tuple[int, Dataset | None]]


@dataclass
class StoreSCP:
    """Our C-STORE SCP: accepts instances only for a study a C-MOVE of ours is waiting for. It listens on
    `port` in plain TCP (unless `plain` is False) and, given `ssl_context`, over DICOM TLS on `tls_port`.
    Given `commitment`, it also takes DICOM Storage Commitment (commitment_scp.py, report_return.py)."""

    store: ObjectStore
    port: int
    limit: int
    host: str = "127.0.0.1"
    read_header: HeaderReader = read_dicom_header
    tls_port: int | None = None
    ssl_context: ssl.SSLContext | None = None
    plain: bool = True
    commitment: CommitmentHandlers | None = None
    # Query/Retrieve for configured workstations (qr_scp.QueryRetrieve): its contexts and handlers.
    query_retrieve: Any | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting: dict[str, InstanceWriter] = field(default_factory=dict)
    _servers: list[Any] = field(default_factory=list)

    def start(self) -> None:
        _spool_received_datasets()
        ae = scp_ae(
            commitment=self.commitment is not None,
            add_query_retrieve=self.query_retrieve.add_contexts if self.query_retrieve is not None else None,
        )
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),  # before the association's DUL thread starts
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.commitment is not None:
            handlers += [
                (evt.EVT_N_ACTION, self.commitment.on_request),
                (evt.EVT_N_EVENT_REPORT, self.commitment.on_result),
            ]
        if self.query_retrieve is not None:
            handlers += self.query_retrieve.handlers()
        listeners: list[tuple[int, ssl.SSLContext | None]] = [(self.port, None)] if self.plain else []
        if self.ssl_context is not None and self.tls_port is not None:
            listeners.append((self.tls_port, self.ssl_context))
        try:
            for port, context in listeners:
                self._servers.append(
                    ae.start_server(
                        (self.host, port), block=False, evt_handlers=handlers, ssl_context=context
                    )
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        while self._servers:
            self._servers.pop().shutdown()

    def expecting(self, study_uid: str) -> _Expectation:
        return _Expectation(self, study_uid)

    def _on_open(self, event: Any) -> None:
        _open_spool(event.assoc.dul, self.store, self.limit)

    def _on_close(self, event: Any) -> None:
        _close_spool(event.assoc.dul)

    def _on_store(self, event: Any) -> int | Dataset:
        spooled = getattr(event.request, "_dataset_file", None)
        study_uid = _study_uid(spooled)
        with self._lock:
            writer = self._waiting.get(study_uid)
        if writer is not None:
            return writer.write(event)
        if isinstance(spooled, SpooledInstance):
            spooled.discard()
        if not study_uid:
            return store_failure(CANNOT_UNDERSTAND, "Instance has no readable Study Instance UID")
        # Nobody asked for this study: we accept no unsolicited images.
        return store_failure(NOT_AUTHORIZED, "No retrieval by SECONDOPINION is waiting for this study")


def scp_ae(*, commitment: bool, add_query_retrieve: Callable[[AE], None] | None = None) -> AE:
    """Our SCP's AE and the presentation contexts it accepts: what `StoreSCP` serves, and what the
    conformance statement (scripts/conformance_statement.py) renders."""
    ae = _our_ae()
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(Verification)  # C-ECHO: how a PACS administrator tests a new destination
    # Every storage class: an instance of one we did not list (a modality's private or raw data) failed
    # its sub-operation at the PACS, and Orthanc ends a C-MOVE at the first failed one.
    storage = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
    # Either role: a workstation's C-GET proposes the SCP role for the classes it receives from us.
    for sop_class in dict.fromkeys([*RETRIEVED_CLASSES, *storage]):
        ae.add_supported_context(
            sop_class, UNCOMPRESSED + OLD_UNCOMPRESSED + COMPRESSED, scu_role=True, scp_role=True
        )
    if commitment:
        # Either role: a PACS sending its result on an association it opens proposes the SCP role.
        ae.add_supported_context(stgcmt.STORAGE_COMMITMENT, scu_role=True, scp_role=True)
    if add_query_retrieve is not None:
        add_query_retrieve(ae)
    return ae


def _study_uid(spooled: object) -> str:
    """The Study Instance UID of a received instance, read from its header (not its pixel data); "" when
    there is none to read."""
    if not isinstance(spooled, SpooledInstance):
        return ""
    spooled.make_readable()
    try:
        header = dcmread(
            spooled.name, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], defer_size=1024
        )
    except Exception:
        return ""
    return str(header.get("StudyInstanceUID") or "")


class _Expectation:
    def __init__(self, scp: StoreSCP, study_uid: str) -> None:
        self._scp, self._study_uid = scp, study_uid

    def __enter__(self) -> InstanceWriter:
        writer = InstanceWriter(self._scp.store, read_header=self._scp.read_header)
        with self._scp._lock:
            self._scp._waiting[self._study_uid] = writer
        return writer

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        with self._scp._lock:
            writer = self._scp._waiting.pop(self._study_uid, None)
        if exc_type is not None and writer is not None:
            writer.discard()
