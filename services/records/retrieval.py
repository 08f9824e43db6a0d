"""Query/retrieve of a case's study from its partner's PACS (DIMSE or DICOMweb), run by a background loop
of the records process: claimed one at a time, retried with backoff, then reported as incomplete records.
"""

from __future__ import annotations

import ssl
import time
import uuid
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.envelope import new_event
from contracts.events import RecordsIncomplete
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.db import utcnow
from services.common.errors import RecordsRejected
from services.records import dicom_tls, dicomweb_source, dimse
from services.records.adequacy import assess
from services.records.archive import Entry
from services.records.archive_store import ArchiveUnavailable
from services.records.assembly import SOURCE, case_files
from services.records.classify import DicomHeader, HeaderReader, check_budget, read_dicom_header
from services.records.limits import ImportLimits, get_limits
from services.records.models import (
    RecordRequest,
    RecordRetrieval,
    RecordSource,
    RecordSourceBase,
    RetrievalStatus,
    retry_or_fail,
)
from services.records.polled import PolledLoop
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)


class RetrievalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_", extra="ignore")

    scp_port: int = 11112
    scp_host: str = "127.0.0.1"
    # The plain listener on scp_port; off (false) leaves only the TLS one.
    scp_plain: bool = True
    # Our SCP over DICOM TLS (2762 by convention), beside or instead of the plain one: on when a port,
    # a certificate and its key are given; with a client CA, a client must present a certificate it signed.
    scp_tls_port: int | None = None
    scp_tls_cert_path: Path | None = None
    scp_tls_key_path: Path | None = None
    scp_tls_client_ca_path: Path | None = None
    # Where the TLS files of image sources are kept (each PACS's CA bundle, our client certificates); a
    # source's tls_* paths are read only from here. DATA_DIR/records/dicom-tls when not set.
    dicom_tls_dir: Path | None = None
    # With ENV=prod, plain DIMSE to or from a peer not on this machine is refused unless this says the link
    # is protected another way (a VPN, a private line).
    dimse_plain_protected: bool = False
    retrieval_attempts: int = 3
    retrieval_timeout_seconds: float = 30.0
    retrieval_backoff_seconds: float = 30.0
    retrieval_poll_seconds: float = 2.0

    def scp_tls_context(self) -> ssl.SSLContext | None:
        """Our SCP's TLS context, when its TLS listener is configured (raises when its files are unusable)."""
        if self.scp_tls_port is None:
            return None
        if self.scp_tls_cert_path is None or self.scp_tls_key_path is None:
            raise dicom_tls.TlsFilesUnusable(
                "RECORDS_SCP_TLS_PORT needs RECORDS_SCP_TLS_CERT_PATH and RECORDS_SCP_TLS_KEY_PATH"
            )
        return dicom_tls.server_context(
            self.scp_tls_cert_path, self.scp_tls_key_path, self.scp_tls_client_ca_path
        )

    def scp_tls_client(self) -> dicom_tls.ClientTls | None:
        """How our SCP reaches a workstation's SCP over TLS for a C-MOVE (qr_scp.py): with its own certificate,
        trusting the CA its clients' certificates are checked against; None without those."""
        if not (self.scp_tls_client_ca_path and self.scp_tls_cert_path and self.scp_tls_key_path):
            return None
        return dicom_tls.ClientTls(
            str(self.scp_tls_client_ca_path), str(self.scp_tls_cert_path), str(self.scp_tls_key_path)
        )

    def tls_dir(self, settings: Settings) -> Path:
        return self.dicom_tls_dir or settings.data_dir / "records" / "dicom-tls"

    def production_problems(self) -> list[str]:
        """What keeps our DIMSE links from being safe for PHI in production (empty when they are)."""
        problems = []
        if self.scp_plain and not dicom_tls.is_loopback(self.scp_host) and not self.dimse_plain_protected:
            problems.append(
                f"RECORDS_SCP_HOST {self.scp_host} takes plain DIMSE from the network: serve DICOM TLS "
                "(RECORDS_SCP_TLS_PORT, _CERT_PATH, _KEY_PATH) with RECORDS_SCP_PLAIN=false, or set "
                "RECORDS_DIMSE_PLAIN_PROTECTED=true if a VPN protects every DIMSE link"
            )
        try:
            self.scp_tls_context()
        except dicom_tls.TlsFilesUnusable as exc:
            problems.append(f"our SCP's DICOM TLS: {exc}")
        return problems


@lru_cache
def get_retrieval_settings() -> RetrievalSettings:
    return RetrievalSettings()


def require_dimse_safe_for_production(settings: Settings, options: RetrievalSettings) -> None:
    """Refuse to start with ENV=prod while our SCP takes plain DIMSE from the network unprotected (naming
    every other unsafe setting too, as every process does)."""
    if settings.env != "prod":
        return
    problems = settings.production_problems(uses_temporal=False) + options.production_problems()
    if problems:
        raise SystemExit("refusing to start with ENV=prod:\n- " + "\n- ".join(problems))


class PlainDimseRefused(Exception):
    """Plain DIMSE to a PACS off this machine, with ENV=prod and no VPN declared: not tried, not retried."""


def dimse_source(
    source: RecordSource, timeout: float, settings: Settings, options: RetrievalSettings | None = None
) -> dimse.DimseSource:
    """How we reach the source's PACS over DIMSE: over TLS when it says so. With ENV=prod a plain link to a
    PACS not on this machine is refused (PHI would cross the network in clear) unless
    RECORDS_DIMSE_PLAIN_PROTECTED says a VPN protects it."""
    host = str(source.host)
    tls = None
    if source.tls:
        try:
            tls = client_tls(source, (options or get_retrieval_settings()).tls_dir(settings))
        except dicom_tls.TlsFilesUnusable as exc:
            raise dimse.PacsUnavailable(f"DICOM TLS to the PACS cannot start: {exc}") from None
    elif plain_dimse_refused(host, settings, options):
        raise PlainDimseRefused(plain_dimse_refusal())
    return dimse.DimseSource(str(source.ae_title), host, int(source.port or 104), timeout, tls)


def client_tls(source: RecordSourceBase, directory: Path) -> dicom_tls.ClientTls:
    """The source's TLS settings, its files read from `directory` (raises when one is not there)."""
    files = {
        field: dicom_tls.within(directory, field, path) if path else None
        for field, path in (
            ("tls_ca_path", source.tls_ca_path),
            ("tls_cert_path", source.tls_cert_path),
            ("tls_key_path", source.tls_key_path),
        )
    }
    return dicom_tls.ClientTls(
        str(files["tls_ca_path"]), files["tls_cert_path"], files["tls_key_path"], source.tls_server_name
    )


def check_client_tls(source: RecordSourceBase, settings: Settings) -> str | None:
    """Why the source's TLS files cannot be used (missing, unreadable, not PEM, key not matching), or None."""
    try:
        client_tls(source, get_retrieval_settings().tls_dir(settings)).context()
    except dicom_tls.TlsFilesUnusable as exc:
        return str(exc)
    return None


def plain_dimse_refused(host: str, settings: Settings, options: RetrievalSettings | None = None) -> bool:
    """Plain DIMSE to `host` is refused: ENV=prod, a PACS off this machine, and no VPN declared."""
    protected = (options or get_retrieval_settings()).dimse_plain_protected
    return settings.env == "prod" and not dicom_tls.is_loopback(host) and not protected


def plain_dimse_refusal() -> str:
    return (
        "plain DIMSE to a PACS on another machine is refused in production: set tls (with tls_ca_path, and "
        "a client certificate if the PACS asks for one), or RECORDS_DIMSE_PLAIN_PROTECTED=true on the "
        "records service if a VPN protects the link"
    )


def study_query(request: RecordRequest) -> dimse.StudyQuery | None:
    """What the request names, most precise first: the study UID, the accession number, or else the
    facility's patient id and the exam date (an ultrasound study that day). None when it names nothing."""
    exam, patient = request.exam, request.patient
    if exam.get("study_instance_uid") or exam.get("accession_number"):
        return dimse.StudyQuery(
            study_uid=exam.get("study_instance_uid"), accession=exam.get("accession_number")
        )
    if patient.get("mrn") and exam.get("performed_on"):
        return dimse.StudyQuery(
            patient_id=patient["mrn"], study_date=str(exam["performed_on"]).replace("-", "")
        )
    return None


def plan_retrieval(session: Session, request: RecordRequest) -> RecordRetrieval | None:
    """A pending retrieval when the partner has a source and the request names the study; one per case."""
    if not request.partner_id or study_query(request) is None:
        return None
    if session.get(RecordSource, request.partner_id) is None:
        return None
    existing = session.exec(select(RecordRetrieval).where(RecordRetrieval.case_id == request.case_id)).first()
    if existing is not None:
        return None
    retrieval = RecordRetrieval(
        retrieval_id=str(uuid.uuid4()),
        case_id=request.case_id,
        partner_id=request.partner_id,
        status=RetrievalStatus.PENDING,
    )
    session.add(retrieval)
    log.info("records.retrieval_planned", case_id=request.case_id, retrieval_id=retrieval.retrieval_id)
    return retrieval


def run_due(
    engine: Engine,
    settings: Settings,
    *,
    scp: dimse.StoreSCP | None = None,
    retrieval_settings: RetrievalSettings | None = None,
    limits: ImportLimits | None = None,
) -> int:
    """Run every retrieval that is due now; returns how many were attempted."""
    options = retrieval_settings or get_retrieval_settings()
    attempted = 0
    # A running retrieval whose worker died is taken over once its lease (a few timeouts) has passed.
    lease = timedelta(seconds=options.retrieval_timeout_seconds * 4 + 60)
    while (claimed := _claim(engine, lease)) is not None:
        retrieval, source, request = claimed
        attempted += 1
        _attempt(engine, settings, options, limits or get_limits(), scp, retrieval, source, request)
    return attempted


def _claim(engine: Engine, lease: timedelta) -> tuple[RecordRetrieval, RecordSource, RecordRequest] | None:
    with Session(engine, expire_on_commit=False) as session:
        query = (
            select(RecordRetrieval)
            .where(
                col(RecordRetrieval.status).in_([RetrievalStatus.PENDING, RetrievalStatus.RUNNING]),
                RecordRetrieval.next_attempt_at <= utcnow(),
            )
            .order_by(col(RecordRetrieval.next_attempt_at))
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        retrieval = session.exec(query).first()
        if retrieval is None:
            return None
        source = session.get(RecordSource, retrieval.partner_id)
        request = session.get(RecordRequest, retrieval.case_id)
        if source is None or request is None or request.cancelled_at is not None:
            retrieval.status, retrieval.finished_at = RetrievalStatus.CANCELLED, utcnow()
            session.add(retrieval)
            session.commit()
            return _claim(engine, lease)
        retrieval.status = RetrievalStatus.RUNNING
        retrieval.started_at = utcnow()
        retrieval.attempts += 1
        retrieval.next_attempt_at = utcnow() + lease
        session.add(retrieval)
        session.commit()
        return retrieval, source, request


def _attempt(
    engine: Engine,
    settings: Settings,
    options: RetrievalSettings,
    limits: ImportLimits,
    scp: dimse.StoreSCP | None,
    retrieval: RecordRetrieval,
    source: RecordSource,
    request: RecordRequest,
) -> None:
    from services.records.uploads import RecordsCancelled, accept_entries

    store = ObjectStore.for_settings(settings)
    started = time.monotonic()
    try:
        study_uid, entries, refused = _fetch(source, request, store, settings, options, limits, scp)
    except dimse.PacsUnavailable as exc:
        _failed_attempt(engine, options, retrieval, str(exc))
        return
    except PlainDimseRefused as exc:
        _finish(engine, retrieval, RetrievalStatus.FAILED, str(exc))
        log.warning(
            "records.retrieval_refused_plain_dimse",
            case_id=request.case_id,
            retrieval_id=retrieval.retrieval_id,
        )
        return
    if study_uid is None:
        _finish(
            engine,
            retrieval,
            RetrievalStatus.FAILED,
            "the PACS has no study with the requested UID or accession",
        )
        return
    fetched = time.monotonic()
    refusals = _refusals(refused, kept=len(entries))
    if refusals is not None:
        log.warning(
            "records.retrieved_instances_refused",
            case_id=request.case_id,
            retrieval_id=retrieval.retrieval_id,
            refused=len(refused),
            kept=len(entries),
        )
    if refused and not entries:
        _finish(engine, retrieval, RetrievalStatus.FAILED, refusals, study_uid)
        return
    try:
        with Session(engine, expire_on_commit=False) as session:
            method = "dicomweb" if source.dicomweb_url else source.retrieve_method
            accept_entries(request.case_id, entries, session, settings, source=method, limits=limits)
    except RecordsCancelled:
        _finish(engine, retrieval, RetrievalStatus.CANCELLED, None)
        return
    except ArchiveUnavailable as exc:
        _failed_attempt(engine, options, retrieval, str(exc))
        return
    except RecordsRejected as exc:
        _finish(engine, retrieval, RetrievalStatus.FAILED, str(exc)[:300], study_uid)
        return
    _finish(engine, retrieval, RetrievalStatus.DONE, refusals, study_uid)
    log.info(
        "records.retrieved",
        case_id=request.case_id,
        retrieval_id=retrieval.retrieval_id,
        instances=len(entries),
        fetch_seconds=round(fetched - started, 3),
        store_seconds=round(time.monotonic() - fetched, 3),
    )


def _refusals(refused: list[str], *, kept: int) -> str | None:
    """What the retrieval says about the instances it refused (each was answered with a C-STORE failure
    naming the problem): how many, and the first few problems."""
    if not refused:
        return None
    summary = (
        f"{len(refused)} instance(s) the PACS sent were refused and not kept, {kept} kept: "
        + "; ".join(refused[:3])
    )
    return summary if len(summary) <= 300 else summary[:297] + "..."


def _fetch(
    source: RecordSource,
    request: RecordRequest,
    store: ObjectStore,
    settings: Settings,
    options: RetrievalSettings,
    limits: ImportLimits,
    scp: dimse.StoreSCP | None,
) -> tuple[str | None, list[Entry], list[str]]:
    query = study_query(request)
    if query is None:
        return None, [], []
    timeout = options.retrieval_timeout_seconds
    if source.dicomweb_url:
        web = dicomweb_source.DicomwebSource(source.dicomweb_url, source.dicomweb_auth_env, timeout)
        found = dicomweb_source.find_studies(web, query)
        if not found:
            return None, [], []
        entries = dicomweb_source.get_study(
            web, found[0], store, limit=settings.max_upload_bytes, max_parts=limits.max_archive_members
        )
        return found[0], entries, []
    pacs = dimse_source(source, timeout, settings, options)
    found = dimse.find_studies(pacs, query)
    if not found:
        return None, [], []
    if source.retrieve_method == "c-move":
        if scp is None:
            raise dimse.PacsUnavailable("C-MOVE needs our C-STORE SCP, which is not running")
        retrieved = dimse.move_study(pacs, found[0], scp)
    else:
        retrieved = dimse.get_study(
            pacs, found[0], store, limit=settings.max_upload_bytes, read_header=_header_reader(limits)
        )
    return found[0], retrieved.entries, retrieved.refused


def _header_reader(limits: ImportLimits) -> HeaderReader:
    """How a retrieved instance's header is read and checked as it arrives: as an upload's is (isolated, by
    default, and within the same budgets)."""
    from services.records.uploads import header_reader

    read = header_reader(limits) or read_dicom_header

    def read_within_limits(path: Path) -> DicomHeader:
        header = read(path)
        check_budget(header, limits.max_pixel_bytes, limits.max_header_bytes)
        return header

    return read_within_limits


def _failed_attempt(
    engine: Engine, options: RetrievalSettings, retrieval: RecordRetrieval, error: str
) -> None:
    with Session(engine) as session:
        row = session.get(RecordRetrieval, retrieval.retrieval_id, with_for_update=True)
        if row is None or row.status != RetrievalStatus.RUNNING:
            return
        row.last_error = error[:300]
        if not retry_or_fail(row, options.retrieval_attempts, options.retrieval_backoff_seconds):
            _report_unreachable(session, row)
        session.add(row)
        session.commit()
    log.warning(
        "records.retrieval_attempt_failed",
        case_id=retrieval.case_id,
        retrieval_id=retrieval.retrieval_id,
        error=error,
    )


def _report_unreachable(session: Session, row: RecordRetrieval) -> None:
    request = session.get(RecordRequest, row.case_id)
    if request is None or request.assembled_at is not None:
        return
    adequacy = assess(case_files(session, row.case_id), request.exam)
    warning = f"the facility's PACS could not be queried after {row.attempts} attempts ({row.last_error}); upload the study instead"
    incomplete = RecordsIncomplete(
        case_id=row.case_id, missing=adequacy.missing, warnings=[*adequacy.warnings, warning]
    )
    enqueue(
        session,
        EVENTS,
        new_event(
            id=f"records.incomplete:{row.case_id}:retrieval:{row.retrieval_id}",
            source=SOURCE,
            subject=row.case_id,
            data=incomplete,
        ),
    )


def _finish(
    engine: Engine,
    retrieval: RecordRetrieval,
    status: RetrievalStatus,
    error: str | None,
    study_uid: str | None = None,
) -> None:
    with Session(engine) as session:
        row = session.get(RecordRetrieval, retrieval.retrieval_id, with_for_update=True)
        if row is None:
            return
        row.status, row.finished_at, row.last_error = status, utcnow(), error
        row.study_instance_uid = study_uid or row.study_instance_uid
        session.add(row)
        session.commit()


class RetrievalLoop(PolledLoop):
    """The records process's background retriever (and its C-STORE SCP for C-MOVE, which also takes storage
    commitment requests and results when given `commitment`)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        options: RetrievalSettings | None = None,
        commitment: dimse.CommitmentHandlers | None = None,
        query_retrieve: Any | None = None,
    ) -> None:
        self._settings = settings
        self._commitment = commitment
        self._query_retrieve = query_retrieve
        self._options = options = options or get_retrieval_settings()
        self.scp: dimse.StoreSCP | None = None
        # Woken when the consumer commits a planned retrieval; the poll finds retries when they fall due.
        super().__init__(
            "records-retrieval",
            lambda: run_due(engine, settings, scp=self.scp, retrieval_settings=options),
            options.retrieval_poll_seconds,
            options.retrieval_timeout_seconds + 5,
        )

    def start(self) -> None:
        options = self._options
        try:
            scp = dimse.StoreSCP(
                ObjectStore.for_settings(self._settings),
                options.scp_port,
                self._settings.max_upload_bytes,
                host=options.scp_host,
                read_header=_header_reader(get_limits()),
                tls_port=options.scp_tls_port,
                ssl_context=options.scp_tls_context(),
                plain=options.scp_plain,
                commitment=self._commitment,
                query_retrieve=self._query_retrieve,
            )
            scp.start()
            self.scp = scp
        except dicom_tls.TlsFilesUnusable as exc:
            log.error("records.scp_not_started", port=options.scp_tls_port, error=str(exc))
        except OSError as exc:
            # Without the SCP, C-GET and DICOMweb still work; C-MOVE retrievals are retried then reported.
            log.error("records.scp_not_started", port=options.scp_port, error=type(exc).__name__)
        super().start()

    def stop(self) -> None:
        super().stop()
        if self.scp is not None:
            self.scp.stop()
