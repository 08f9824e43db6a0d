"""The second opinion sent back into the facility's PACS: each version of the report (the review service's DICOM
Encapsulated PDF, in the study it reads) is C-STOREd to the partner's PACS, or STOW-RS'd to its DICOMweb
service, when the partner's source says `return_reports`. So the radiologists who asked see it beside the
images in their own viewer, as they see their own reports. What is sent is the copy records stores, placed
into the study when it was stored (report_study.py), under the same SOP Instance UID as the copy records
hands out, with the same patient and study. Its identifiers are the facility's (IHE IRWF: each copy carries
those of the domain it goes to, reconcile.py): Patient ID, Issuer of Patient ID and Accession Number as the
facility's images carry them, so its PACS files it with the study; the copy records hands out carries ours,
with exactly these kept as its originals (Original Attributes Sequence), for a PACS importing that one to
reconcile it back.

The send is queued in the transaction that stores the report (`record_report_returns`), and a background loop
of the records process sends it: claimed one at a time, retried with backoff while the PACS is down or busy,
then marked failed with why (shown in `GET /v1/records/{case}`). A PACS that refuses the instance itself (a
C-STORE failure status, STOW-RS 409 or another 4xx) is not retried: sending the same bytes again would be
refused again. Nothing here logs PHI: the case id, the SOP Instance UID and the DIMSE status or HTTP code.

A PACS whose source says `storage_commitment` is then asked, on the same association, to commit the instance
(DICOM Storage Commitment, storage_commitment.py): an N-ACTION with a Transaction UID kept on the return (a new
one per attempt). The return is done only when the PACS's N-EVENT-REPORT says the instance is committed; it
may come on that association (we wait `commitment_linger_seconds` for it) or, as most PACS send it, on an
association the PACS opens to our SCP (`record_commitment_result`). The instance listed as failed, or no result
within `commitment_timeout_seconds`, is sent and asked again, counted as an attempt, and after the last one the
return is failed with why (`commitment: not_committed`), never done.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from io import BytesIO
from typing import Any

import httpx
import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common.config import Settings
from services.common.db import insert_new, utcnow
from services.records import dimse
from services.records import storage_commitment as stgcmt
from services.records.archive_store import ArchiveUnavailable, stow_request
from services.records.dicomweb_source import DicomwebSource
from services.records.models import (
    Commitment,
    RecordFile,
    RecordImport,
    RecordSource,
    ReportReturn,
    RetrievalStatus,
    retry_or_fail,
)
from services.records.polled import PolledLoop
from services.records.report_study import images_held, stored_unplaced_while_held
from services.records.retrieval import PlainDimseRefused, dimse_source
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)
# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success, and the warnings (coerced, elements discarded,
# does not match the SOP class). Anything else is the PACS refusing this instance.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# Statuses that mean "not now": out of resources (0xA7xx), and "cannot understand" is a refusal.
BUSY_PREFIX = 0xA700


class ReturnSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_REPORT_RETURN_", extra="ignore")

    attempts: int = 8  # with the backoff below: about 2 hours of a PACS down before the send is given up
    backoff_seconds: float = 30.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 5.0
    held_recheck_seconds: float = 60.0  # a return whose case has images held for identity: looked at again
    # Storage commitment (sources with storage_commitment): how long the PACS's result is awaited before the
    # report is sent and asked again, and how long the association is kept open for a result sent on it.
    commitment_timeout_seconds: float = 3600.0
    commitment_linger_seconds: float = 5.0


@lru_cache
def get_return_settings() -> ReturnSettings:
    return ReturnSettings()


class Refused(Exception):
    """The PACS refused this instance: sending it again would not help."""


class _Cancelled(Exception):
    """The return was cancelled while it was being sent: left as it is."""


@dataclass(frozen=True)
class CommitmentAsk:
    """Ask the PACS to commit the instance sent, in this transaction; handle a result sent on the association."""

    transaction_uid: str
    on_result: Any  # the association's EVT_N_EVENT_REPORT handler
    linger: float

    def on_sent(self, event: Any) -> None:
        """Our answer to a result that came on the association is going out: the send may end (release)."""
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            _wake_waiter(self.transaction_uid)


RESPONSE_GRACE_SECONDS = 0.2
# Transactions whose send waits, association open, for a result: set when it is recorded, however it came.
_awaited: dict[str, threading.Event] = {}
_awaited_lock = threading.Lock()


def plan_return(
    session: Session, *, case_id: str, partner_id: str, sop_instance_uid: str, sha256: str, version: int
) -> None:
    """Queue the report instance for the partner's PACS if its source asks for reports; the caller commits.
    The same instance (a redelivered event) is queued once."""
    source = session.get(RecordSource, partner_id)
    if source is None or not source.return_reports:
        return
    row = ReportReturn(
        return_id=sop_instance_uid,
        case_id=case_id,
        partner_id=partner_id,
        sha256=sha256,
        version=version,
        status=RetrievalStatus.PENDING.value,
    )
    insert_new(session, [row])  # noted as added: the consumer's commit wakes the loop


def run_due(engine: Engine, settings: Settings, options: ReturnSettings | None = None) -> int:
    """Send every report return that is due now; returns how many were attempted."""
    options = options or get_return_settings()
    lease = timedelta(seconds=options.timeout_seconds * 4 + 60)
    attempted = 0
    due_by = utcnow()  # what falls due during this pass (a retry) waits for the next one
    while (claimed := _claim(engine, settings, lease, due_by, options)) is not None:
        row, source, storage_path = claimed
        attempted += 1
        try:
            filed = _as_stored(settings, row, storage_path)
            sent_uid = str(
                dcmread(
                    BytesIO(filed), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                ).SOPInstanceUID
            )
            ask = _commitment_ask(engine, options, source, row, sent_uid)
            _send(source, filed, options.timeout_seconds, settings, ask)
        except _Cancelled:
            continue
        except (Refused, PlainDimseRefused) as exc:
            _finish(engine, row, RetrievalStatus.FAILED, str(exc))
            log.warning(
                "records.report_return_refused",
                case_id=row.case_id,
                sop_instance_uid=row.return_id,
                reason=str(exc),
            )
        except (dimse.PacsUnavailable, ArchiveUnavailable) as exc:
            _failed_attempt(engine, options, row, str(exc))
        except Exception as exc:  # a file that cannot be read, a library's error: counted, then given up
            log.exception("records.report_return_error", case_id=row.case_id, sop_instance_uid=row.return_id)
            _failed_attempt(engine, options, row, f"the send failed unexpectedly ({type(exc).__name__})")
        else:
            if ask is not None:
                _await_commitment(engine, options, row, ask.transaction_uid)
                continue
            _finish(engine, row, RetrievalStatus.DONE, None, sent_uid)
            log.info(
                "records.report_returned",
                case_id=row.case_id,
                sop_instance_uid=row.return_id,
                version=row.version,
            )
    return attempted


def _commitment_ask(
    engine: Engine, options: ReturnSettings, source: RecordSource, claimed: ReportReturn, sent_uid: str
) -> CommitmentAsk | None:
    """For a PACS asked for storage commitment: a new transaction for this attempt, kept on the return (with
    the instance it names) before the N-ACTION goes, since the result may come on another association first."""
    if not source.storage_commitment or source.dicomweb_url:
        return None
    transaction_uid = generate_uid()
    with Session(engine) as session:
        row = session.get(ReportReturn, claimed.return_id, with_for_update=True)
        if row is None or row.status != RetrievalStatus.RUNNING:
            raise _Cancelled
        row.transaction_uid, row.sent_sop_instance_uid = transaction_uid, sent_uid
        session.add(row)
        session.commit()

    def on_result(event: Any) -> tuple[int, None]:
        # The send is woken once our N-EVENT-REPORT response goes (`on_sent`), not here: a release requested
        # before it would reach the PACS first, and a PACS awaiting release then aborts (PS3.8 Sta8, AA-8).
        return answer_commitment_result(engine, event, options, wake=False), None

    return CommitmentAsk(transaction_uid, on_result, options.commitment_linger_seconds)


def _await_commitment(
    engine: Engine, options: ReturnSettings, claimed: ReportReturn, transaction_uid: str
) -> None:
    """The PACS stored the instance and accepted the commitment request: its result is awaited until the
    deadline (unless it came already, on the association or on another)."""
    with Session(engine) as session:
        row = session.get(ReportReturn, claimed.return_id, with_for_update=True)
        if row is None or row.status != RetrievalStatus.RUNNING or row.transaction_uid != transaction_uid:
            return  # the result came first, or the case was cancelled meanwhile
        row.commitment = Commitment.REQUESTED
        row.next_attempt_at = utcnow() + timedelta(seconds=options.commitment_timeout_seconds)
        session.add(row)
        session.commit()
    log.info(
        "records.report_commitment_requested",
        case_id=claimed.case_id,
        sop_instance_uid=claimed.return_id,
        transaction_uid=transaction_uid,
    )


def answer_commitment_result(
    engine: Engine, event: Any, options: ReturnSettings | None = None, *, wake: bool = True
) -> int:
    """Our EVT_N_EVENT_REPORT handler, on the association of a send or on our SCP: the DIMSE status to answer.
    A result for a transaction we no longer wait for (answered, superseded by a later attempt) is taken and
    ignored."""
    try:
        result = stgcmt.read_result(event.event_type, event.event_information)
    except stgcmt.Malformed as exc:
        log.warning("records.commitment_result_malformed", error=str(exc))
        return stgcmt.INVALID_ARGUMENT_VALUE
    except Exception:
        log.exception("records.commitment_result_unreadable")
        return stgcmt.PROCESSING_FAILURE
    record_commitment_result(engine, result, options, wake=wake)
    return stgcmt.SUCCESS


def record_commitment_result(
    engine: Engine, result: stgcmt.Result, options: ReturnSettings | None = None, *, wake: bool = True
) -> None:
    """The PACS's storage commitment result: the return is done once the instance is committed; listed as
    failed (or not named), it is sent again while attempts remain, else failed, saying why. `wake`: end the
    send's wait for it now (it came on another association)."""
    options = options or get_return_settings()
    with Session(engine) as session:
        row = session.exec(
            select(ReportReturn)
            .where(ReportReturn.transaction_uid == result.transaction_uid)
            .with_for_update()
        ).first()
        if row is None or row.status != RetrievalStatus.RUNNING:
            log.info("records.commitment_result_ignored", transaction_uid=result.transaction_uid)
            if wake:
                _wake_waiter(result.transaction_uid)
            return
        ours = row.sent_sop_instance_uid or row.return_id
        failure = next((f for f in result.failed if f.reference.sop_instance_uid == ours), None)
        if failure is None and any(r.sop_instance_uid == ours for r in result.committed):
            row.status, row.commitment, row.last_error = RetrievalStatus.DONE, Commitment.COMMITTED, None
            row.finished_at = row.committed_at = utcnow()
        else:
            reason = (
                f"the PACS did not commit the report instance ({failure.describe()})"
                if failure is not None
                else "the PACS's storage commitment result does not name the report instance"
            )
            _not_committed(row, options, reason)
        case_id, return_id, state = row.case_id, row.return_id, row.status
        session.add(row)
        session.commit()
    if wake:
        _wake_waiter(result.transaction_uid)
    log.info(
        "records.report_commitment_result",
        case_id=case_id,
        sop_instance_uid=return_id,
        transaction_uid=result.transaction_uid,
        status=state,
    )


def _not_committed(row: ReportReturn, options: ReturnSettings, reason: str) -> None:
    """Not committed: sent and asked again after the backoff while attempts remain, else failed with why."""
    row.commitment = Commitment.NOT_COMMITTED
    if retry_or_fail(row, options.attempts, options.backoff_seconds):
        row.last_error = f"{reason}; it is sent again"[:300]
    else:
        row.last_error = f"{reason}, after {row.attempts} attempts; the PACS may not hold it"[:300]
    log.warning(
        "records.report_not_committed", case_id=row.case_id, sop_instance_uid=row.return_id, reason=reason
    )


def _wake_waiter(transaction_uid: str) -> None:
    with _awaited_lock:
        waiter = _awaited.get(transaction_uid)
    if waiter is not None:
        waiter.set()


def _claim(
    engine: Engine, settings: Settings, lease: timedelta, due_by: datetime, options: ReturnSettings
) -> tuple[ReportReturn, RecordSource, str] | None:
    """The next return due, leased to this process; returns whose partner stopped asking, or whose file left
    the case's records while they waited, are cancelled with why on the way, and a report the version before
    last queued unplaced is placed first (queued again as placed, sent on the next pass)."""
    while True:
        with Session(engine, expire_on_commit=False) as session:
            query = (
                select(ReportReturn)
                .where(
                    col(ReportReturn.status).in_([RetrievalStatus.PENDING, RetrievalStatus.RUNNING]),
                    ReportReturn.next_attempt_at <= due_by,
                )
                .order_by(col(ReportReturn.next_attempt_at))
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = session.exec(query).first()
            if row is None:
                return None
            source = session.get(RecordSource, row.partner_id)
            stored = session.exec(
                select(RecordFile.storage_path).where(
                    RecordFile.case_id == row.case_id, RecordFile.sha256 == row.sha256
                )
            ).first()
            if row.commitment == Commitment.REQUESTED and row.status == RetrievalStatus.RUNNING:
                # Claimed because the commitment deadline passed with no result from the PACS: failed after
                # the last attempt, else sent and asked again now (the deadline was the wait, no backoff more).
                waited = f"the PACS sent no storage commitment result within {options.commitment_timeout_seconds:g} s"
                _not_committed(row, options, waited)
                if row.status == RetrievalStatus.FAILED:
                    session.add(row)
                    session.commit()
                    continue
            if (
                row.attempts >= options.attempts
            ):  # its last attempt's lease ran out: the process died mid-send
                row.status, row.finished_at = RetrievalStatus.FAILED, utcnow()
                row.last_error = f"no send finished in {row.attempts} attempts (the process stopped mid-send)"
                session.add(row)
                session.commit()
                continue
            if images_held(session, row.case_id):
                # Its images wait for a person's identity decision: the report would be filed under the
                # wrong identity (or beside the study). Looked at again later, no attempt counted.
                row.next_attempt_at = utcnow() + timedelta(seconds=options.held_recheck_seconds)
                row.last_error = "waiting for a person's identity decision on the case's images (see imports)"
                session.add(row)
                session.commit()
                continue
            asked = source is not None and source.return_reports and stored is not None
            left_unplaced = asked and stored_unplaced_while_held(session, row.case_id, row.sha256)
            if left_unplaced:
                _place_first(session, settings, options, row, left_unplaced)
                continue
            if source is not None and source.return_reports and stored is not None:
                row.status = RetrievalStatus.RUNNING
                row.attempts += 1
                row.next_attempt_at = utcnow() + lease  # taken over after this if the process dies mid-send
                session.add(row)
                session.commit()
                return row, source, stored
            row.status, row.finished_at = RetrievalStatus.CANCELLED, utcnow()
            row.last_error = (
                "the report instance is no longer in the case's records"
                if stored is None
                else "the partner's source no longer asks for reports back"
            )
            session.add(row)
            session.commit()


def _place_first(
    session: Session, settings: Settings, options: ReturnSettings, row: ReportReturn, report: RecordImport
) -> None:
    """Place the report of `row` that an earlier version stored unplaced, and commit: `row` gives way to the
    return of the copy placed. One that cannot be placed now is looked at again later, saying why."""
    # Imported here: second_opinion queues its returns through this module.
    from services.records.second_opinion import place_report_left_unplaced

    case_id, return_id = row.case_id, row.return_id
    try:
        row.status = RetrievalStatus.PENDING  # as place_report_left_unplaced replaces pending returns
        session.add(row)
        session.flush()
        placed = place_report_left_unplaced(report, session, settings)
        if not placed:
            row.status, row.finished_at = RetrievalStatus.CANCELLED, utcnow()
            row.last_error = "the case was cancelled"
            session.add(row)
        session.commit()
    except Exception as exc:
        session.rollback()
        log.exception("records.report_return_placing_failed", case_id=case_id, sop_instance_uid=return_id)
        row = session.get(ReportReturn, return_id, with_for_update=True) or row
        row.next_attempt_at = utcnow() + timedelta(seconds=options.held_recheck_seconds)
        row.last_error = f"the report could not be placed into its study yet ({type(exc).__name__})"
        session.add(row)
        session.commit()
        return
    log.info("records.report_return_placed_first", case_id=case_id, sop_instance_uid=return_id, placed=placed)


def _as_stored(settings: Settings, row: ReportReturn, storage_path: str) -> bytes:
    """The report as records stores it, placed into its study: not placed again here, which could give the
    SOP Instance UID another identity than the copy already handed out (images released since the report
    was stored leave it as it is; one stored while images waited for a decision was placed after it)."""
    # Kept in the object store or the image archive (fetched into the cache on first use).
    return ObjectStore.for_settings(settings).local_path(storage_path, row.sha256).read_bytes()


def _send(
    source: RecordSource, dicom: bytes, timeout: float, settings: Settings, ask: CommitmentAsk | None = None
) -> None:
    if source.dicomweb_url:
        _stow(DicomwebSource(source.dicomweb_url, source.dicomweb_auth_env, timeout), dicom)
    elif source.ae_title and source.host:
        _c_store(dimse_source(source, timeout, settings), dicom, ask)
    else:
        raise Refused("the partner's source names neither a PACS (AE title, host) nor a DICOMweb URL")


def _c_store(source: dimse.DimseSource, dicom: bytes, ask: CommitmentAsk | None = None) -> None:
    """C-STORE the instance; with `ask`, then request its storage commitment on the same association, and keep
    the association open a while for a result the PACS may send on it."""
    dataset = dcmread(BytesIO(dicom))
    ae = dimse._ae(source.timeout)
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    handlers: list[Any] = []
    if ask is not None:
        ae.add_requested_context(stgcmt.STORAGE_COMMITMENT)
        handlers = [(evt.EVT_N_EVENT_REPORT, ask.on_result), (evt.EVT_DIMSE_SENT, ask.on_sent)]
    assoc = dimse._associate(ae, source, evt_handlers=handlers)
    if not assoc.is_established:
        raise dimse.PacsUnavailable(f"the PACS {source.ae_title} refused or did not answer the association")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if str(dataset.SOPClassUID) not in accepted:
            raise Refused("the PACS does not accept Encapsulated PDF Storage in this transfer syntax")
        status = assoc.send_c_store(dataset)
        _check_stored(status)
        if ask is not None:
            if stgcmt.STORAGE_COMMITMENT not in accepted:
                raise Refused(
                    "the report was stored, but the PACS does not accept Storage Commitment (Push Model): "
                    "turn storage_commitment off on its image source if it does not speak it"
                )
            _request_commitment(assoc, ask, dataset)
    finally:
        if assoc.is_established:
            assoc.release()


def _check_stored(status: Any) -> None:
    if not status or "Status" not in status:
        raise dimse.PacsUnavailable("the PACS did not answer the C-STORE")
    code = int(status.Status)
    if code in STORED:
        return
    if code & 0xFF00 == BUSY_PREFIX:
        raise dimse.PacsUnavailable(f"the PACS is out of resources (C-STORE status 0x{code:04X})")
    raise Refused(f"the PACS refused the report instance (C-STORE status 0x{code:04X})")


def _request_commitment(assoc: Any, ask: CommitmentAsk, dataset: Any) -> None:
    """N-ACTION Request Storage Commitment for the instance just stored; a refusal is retried like a PACS
    that is down. Then wait up to `ask.linger` for the result, on this association or another."""
    reference = stgcmt.Reference(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
    waiter = threading.Event()
    with _awaited_lock:
        _awaited[ask.transaction_uid] = waiter
    try:
        status, _ = assoc.send_n_action(
            stgcmt.request_dataset(ask.transaction_uid, [reference]),
            stgcmt.REQUEST_COMMITMENT,
            stgcmt.STORAGE_COMMITMENT,
            stgcmt.WELL_KNOWN_INSTANCE,
        )
        if not status or "Status" not in status:
            raise dimse.PacsUnavailable("the PACS did not answer the storage commitment request (N-ACTION)")
        code = int(status.Status)
        if code != stgcmt.SUCCESS:
            raise dimse.PacsUnavailable(
                f"the PACS refused the storage commitment request (N-ACTION status 0x{code:04X})"
            )
        if waiter.wait(ask.linger):
            # Woken as our response to a result on this association is being queued (before its PDUs are):
            # give the association's thread a moment to queue them, so the release follows them.
            time.sleep(RESPONSE_GRACE_SECONDS)
    finally:
        with _awaited_lock:
            _awaited.pop(ask.transaction_uid, None)


def _stow(source: DicomwebSource, dicom: bytes) -> None:
    body, headers = stow_request([dicom])
    try:
        with source.client() as client:
            response = client.post("/studies", content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise dimse.PacsUnavailable(f"STOW-RS failed ({type(exc).__name__})") from None
    if response.status_code in (200, 202):  # 202: stored with warnings (PS3.18 10.5.3)
        return
    if response.status_code in (408, 429) or response.status_code >= 500:
        raise dimse.PacsUnavailable(f"STOW-RS answered HTTP {response.status_code}")
    raise Refused(f"the DICOMweb service refused the report instance (STOW-RS HTTP {response.status_code})")


def _failed_attempt(engine: Engine, options: ReturnSettings, claimed: ReportReturn, error: str) -> None:
    with Session(engine) as session:
        row = session.get(ReportReturn, claimed.return_id, with_for_update=True)
        if row is None or row.status != RetrievalStatus.RUNNING:
            return
        row.last_error = error[:300]
        retry_or_fail(row, options.attempts, options.backoff_seconds)
        session.add(row)
        session.commit()
    log.warning(
        "records.report_return_attempt_failed",
        case_id=claimed.case_id,
        sop_instance_uid=claimed.return_id,
        error=error,
    )


def _finish(
    engine: Engine,
    claimed: ReportReturn,
    status: RetrievalStatus,
    error: str | None,
    sent_uid: str | None = None,
) -> None:
    with Session(engine) as session:
        row = session.get(ReportReturn, claimed.return_id, with_for_update=True)
        if row is None:
            return
        row.status, row.finished_at, row.last_error = status, utcnow(), error
        # Placed into another study at send time (images accepted since), the instance sent has its own UID.
        row.sent_sop_instance_uid = sent_uid
        session.add(row)
        session.commit()


class ReturnLoop(PolledLoop):
    """The records process's background sender of reports back to the facilities' PACS."""

    def __init__(self, engine: Engine, settings: Settings, options: ReturnSettings | None = None) -> None:
        options = options or get_return_settings()
        super().__init__(
            "records-report-return",
            lambda: run_due(engine, settings, options),
            options.poll_seconds,
            options.timeout_seconds + 5,
        )
