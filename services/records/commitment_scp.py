"""DICOM Storage Commitment as the committer (SCP): a facility's PACS that sent us a study (C-MOVE to our SCP)
asks us to take responsibility for its instances (N-ACTION on our SCP); we answer with an N-EVENT-REPORT.

The request is kept (record_commitment_requests) in the transaction that answers the N-ACTION, and a
background loop of the records process answers it: so a restart between the request and the answer loses
nothing, and a PACS that cannot be reached is tried again with backoff, then the request is failed with why
(logged for operations). The answer goes on an association we open to the requesting PACS (proposing the SCP
role), at the address of its image source, found by the calling AE title: never an address the request
claims, and a calling AE no image source names is refused (0x0124). Most PACS (Orthanc) release their
association after the N-ACTION and wait for this one; PS3.4 J.3.3 allows either.

An instance is committed when a file of that SOP Instance UID is stored in a case of the requesting source's
partner (or of a partner whose source is the same PACS) and indexed (its record_files row, written once the
content-addressed object is durably on disk). Failure Reasons: 0x0112 no such object instance (also for an
instance of another partner: its existence is not told), 0x0119 class/instance conflict (stored under another
SOP Class UID), 0x0110 processing failure for an instance held for a person's identity decision (IHE IRWF): it
is stored, but a rejection discards it, so we do not take responsibility for it until it is accepted (the PACS
may ask again later). Nothing here logs PHI: the transaction UID, the partner, counts and statuses.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict
from pynetdicom import build_role
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common.config import Settings
from services.common.db import utcnow
from services.records import dimse
from services.records import storage_commitment as stgcmt
from services.records.models import (
    CommitmentRequest,
    RecordFile,
    RecordRequest,
    RecordSource,
    RetrievalStatus,
    retry_or_fail,
)
from services.records.polled import PolledLoop
from services.records.retrieval import PlainDimseRefused, dimse_source

log = structlog.get_logger(__name__)
MAX_REFERENCES = 50_000  # instances in one request: a larger one is refused as a resource limitation
RESOURCE_LIMITATION = 0x0213


class CommitmentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_COMMITMENT_", extra="ignore")

    attempts: int = (
        8  # with the backoff below: about 2 hours of a PACS unreachable before the answer is given up
    )
    backoff_seconds: float = 30.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 5.0


@lru_cache
def get_commitment_settings() -> CommitmentSettings:
    return CommitmentSettings()


def accept_request(engine: Engine, event: Any, wake: Any = None) -> int:
    """Our EVT_N_ACTION handler: keep the request to be answered, and the N-ACTION's status."""
    if event.action_type != stgcmt.REQUEST_COMMITMENT:
        return stgcmt.NO_SUCH_ACTION
    try:
        transaction_uid, references = stgcmt.read_request(event.action_information)
    except stgcmt.Malformed as exc:
        log.warning("records.commitment_request_malformed", error=str(exc))
        return stgcmt.INVALID_ARGUMENT_VALUE
    except Exception:
        log.exception("records.commitment_request_unreadable")
        return stgcmt.PROCESSING_FAILURE
    if len(references) > MAX_REFERENCES:
        return RESOURCE_LIMITATION
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    with Session(engine) as session:
        source = requesting_source(session, calling_ae, str(event.assoc.requestor.address))
        if source is None:
            log.warning("records.commitment_request_unknown_ae", calling_ae=calling_ae)
            return stgcmt.NOT_AUTHORIZED
        partner_id = source.partner_id
        existing = session.get(CommitmentRequest, transaction_uid)
        if existing is not None:  # the same request again (the PACS did not see our answer): answered once
            same = existing.calling_ae == calling_ae and existing.partner_id == partner_id
            return stgcmt.SUCCESS if same else stgcmt.PROCESSING_FAILURE
        session.add(
            CommitmentRequest(
                transaction_uid=transaction_uid,
                calling_ae=calling_ae,
                partner_id=partner_id,
                references=[[r.sop_class_uid, r.sop_instance_uid] for r in references],
                status=RetrievalStatus.PENDING,
            )
        )
        session.commit()
    log.info(
        "records.commitment_requested",
        transaction_uid=transaction_uid,
        partner_id=partner_id,
        instances=len(references),
    )
    if wake is not None:
        wake()
    return stgcmt.SUCCESS


def requesting_source(session: Session, calling_ae: str, peer: str) -> RecordSource | None:
    """The image source whose PACS this is: its AE title is the calling AE (narrowed by the peer's address
    when several are); None when none is, or when several name different PACS."""
    sources = [
        s
        for s in session.exec(select(RecordSource).where(RecordSource.ae_title == calling_ae)).all()
        if s.host
    ]
    if len(sources) > 1:
        sources = [s for s in sources if s.host == peer] or sources
    if len({(s.host, s.port) for s in sources}) != 1:
        if sources:
            log.warning(
                "records.commitment_request_ambiguous_ae", calling_ae=calling_ae, sources=len(sources)
            )
        return None
    return sources[0]


def run_due(engine: Engine, settings: Settings, options: CommitmentSettings | None = None) -> int:
    """Answer every commitment request due now; returns how many were attempted."""
    options = options or get_commitment_settings()
    lease = timedelta(seconds=options.timeout_seconds * 4 + 60)
    attempted = 0
    due_by = utcnow()
    while (claimed := _claim(engine, lease, due_by, options)) is not None:
        row, source = claimed
        attempted += 1
        try:
            with Session(engine) as session:
                result = check(session, row, source)
            _report(dimse_source(source, options.timeout_seconds, settings), result)
        except PlainDimseRefused as exc:
            _finish(engine, row, RetrievalStatus.FAILED, str(exc))
        except dimse.PacsUnavailable as exc:
            _failed_attempt(engine, options, row, str(exc))
        except Exception as exc:
            log.exception("records.commitment_answer_error", transaction_uid=row.transaction_uid)
            _failed_attempt(engine, options, row, f"the answer failed unexpectedly ({type(exc).__name__})")
        else:
            _finish(engine, row, RetrievalStatus.DONE, None, result)
            log.info(
                "records.commitment_answered",
                transaction_uid=row.transaction_uid,
                partner_id=row.partner_id,
                committed=len(result.committed),
                failed=len(result.failed),
            )
    return attempted


def _claim(
    engine: Engine, lease: timedelta, due_by: datetime, options: CommitmentSettings
) -> tuple[CommitmentRequest, RecordSource] | None:
    while True:
        with Session(engine, expire_on_commit=False) as session:
            row = session.exec(
                select(CommitmentRequest)
                .where(
                    col(CommitmentRequest.status).in_([RetrievalStatus.PENDING, RetrievalStatus.RUNNING]),
                    CommitmentRequest.next_attempt_at <= due_by,
                )
                .order_by(col(CommitmentRequest.next_attempt_at))
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            source = session.get(RecordSource, row.partner_id)
            problem = None
            if source is None or not (source.ae_title and source.host):
                problem = "the image source of the PACS that asked no longer names its AE title and host"
            elif row.attempts >= options.attempts:  # its last attempt's lease ran out mid-answer
                problem = (
                    f"no answer was delivered in {row.attempts} attempts (the process stopped mid-answer)"
                )
            if problem is not None or source is None:
                row.status, row.finished_at, row.last_error = RetrievalStatus.FAILED, utcnow(), problem
                session.add(row)
                session.commit()
                continue
            row.status = RetrievalStatus.RUNNING
            row.attempts += 1
            row.next_attempt_at = utcnow() + lease
            session.add(row)
            session.commit()
            return row, source


def check(session: Session, row: CommitmentRequest, source: RecordSource) -> stgcmt.Result:
    """Which of the request's instances we hold for the partner(s) of this PACS, and why each other is not."""
    same_ae = session.exec(select(RecordSource).where(RecordSource.ae_title == source.ae_title)).all()
    same_pacs = [s.partner_id for s in same_ae if (s.host, s.port) == (source.host, source.port)]
    partners = sorted({source.partner_id, *same_pacs})
    references = [stgcmt.Reference(str(c), str(i)) for c, i in row.references]
    held: dict[str, list[RecordFile]] = {}
    uids = sorted({r.sop_instance_uid for r in references})
    for start in range(0, len(uids), 1000):
        files = session.exec(
            select(RecordFile)
            .join(RecordRequest, col(RecordRequest.case_id) == col(RecordFile.case_id))
            .where(
                col(RecordFile.sop_instance_uid).in_(uids[start : start + 1000]),
                col(RecordRequest.partner_id).in_(partners),
            )
        ).all()
        for file in files:
            held.setdefault(str(file.sop_instance_uid), []).append(file)
    committed, failed = [], []
    for reference in references:
        reason = _failure_reason(reference, held.get(reference.sop_instance_uid, []))
        if reason is None:
            committed.append(reference)
        else:
            failed.append(stgcmt.Failure(reference, reason))
    return stgcmt.Result(row.transaction_uid, committed, failed)


def _failure_reason(reference: stgcmt.Reference, files: list[RecordFile]) -> int | None:
    if not files:
        return stgcmt.NO_SUCH_OBJECT_INSTANCE
    if reference.sop_class_uid and all(
        f.sop_class_uid and f.sop_class_uid != reference.sop_class_uid for f in files
    ):
        return stgcmt.CLASS_INSTANCE_CONFLICT
    if not any(f.released for f in files):
        return stgcmt.PROCESSING_FAILURE  # held for a person's identity decision: a rejection discards it
    return None


def _report(pacs: dimse.DimseSource, result: stgcmt.Result) -> None:
    """The N-EVENT-REPORT, on an association we open to the PACS that asked, proposing the SCP role."""
    ae = dimse._ae(pacs.timeout)
    ae.add_requested_context(stgcmt.STORAGE_COMMITMENT)
    role = build_role(stgcmt.STORAGE_COMMITMENT, scp_role=True)
    assoc = dimse._associate(ae, pacs, ext_neg=[role])
    if not assoc.is_established:
        raise dimse.PacsUnavailable(f"the PACS {pacs.ae_title} refused or did not answer the association")
    try:
        if not assoc.accepted_contexts:
            raise dimse.PacsUnavailable(
                "the PACS does not accept Storage Commitment on an association we open"
            )
        event_type, information = stgcmt.result_dataset(result)
        status, _ = assoc.send_n_event_report(
            information, event_type, stgcmt.STORAGE_COMMITMENT, stgcmt.WELL_KNOWN_INSTANCE
        )
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise dimse.PacsUnavailable("the PACS did not answer the storage commitment result (N-EVENT-REPORT)")
    code = int(status.Status)
    if code != stgcmt.SUCCESS:
        raise dimse.PacsUnavailable(f"the PACS refused the storage commitment result (status 0x{code:04X})")


def _failed_attempt(
    engine: Engine, options: CommitmentSettings, claimed: CommitmentRequest, error: str
) -> None:
    with Session(engine) as session:
        row = session.get(CommitmentRequest, claimed.transaction_uid, with_for_update=True)
        if row is None or row.status != RetrievalStatus.RUNNING:
            return
        row.last_error = error[:300]
        retry_or_fail(row, options.attempts, options.backoff_seconds)
        session.add(row)
        session.commit()
    log.warning(
        "records.commitment_answer_failed",
        transaction_uid=claimed.transaction_uid,
        partner_id=claimed.partner_id,
        error=error,
    )


def _finish(
    engine: Engine,
    claimed: CommitmentRequest,
    status: RetrievalStatus,
    error: str | None,
    result: stgcmt.Result | None = None,
) -> None:
    with Session(engine) as session:
        row = session.get(CommitmentRequest, claimed.transaction_uid, with_for_update=True)
        if row is None:
            return
        row.status, row.finished_at, row.last_error = status, utcnow(), error
        if result is not None:
            row.committed, row.failed = len(result.committed), len(result.failed)
        session.add(row)
        session.commit()


class CommitmentLoop(PolledLoop):
    """The records process's background answerer of facilities' storage commitment requests."""

    def __init__(self, engine: Engine, settings: Settings, options: CommitmentSettings | None = None) -> None:
        options = options or get_commitment_settings()
        self._engine = engine
        super().__init__(
            "records-commitment",
            lambda: run_due(engine, settings, options),
            options.poll_seconds,
            options.timeout_seconds + 5,
        )

    def handlers(self, result_handler: Any) -> dimse.CommitmentHandlers:
        """Our SCP's storage commitment handlers: requests kept and answered by this loop (woken at once);
        results for our report returns handed to `result_handler`."""

        def on_request(event: Any) -> tuple[int, None]:
            return accept_request(self._engine, event, self.wake), None

        def on_result(event: Any) -> tuple[int, None]:
            return result_handler(event), None

        return dimse.CommitmentHandlers(on_request=on_request, on_result=on_result)
