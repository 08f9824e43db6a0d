"""A background pass of the records process (retrievals, report returns): run when woken by a commit that
planned work, and every `interval` seconds for retries falling due; one thread, stopped cleanly."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from sqlmodel import Session, col, select

from services.common.db import utcnow
from services.records.models import RecordRetrieval, ReportReturn, RetrievalStatus

log = structlog.get_logger(__name__)


class PolledLoop:
    def __init__(self, name: str, run: Callable[[], object], interval: float, stop_timeout: float) -> None:
        self._name, self._run_once = name, run
        self._interval, self._stop_timeout = interval, stop_timeout
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Work was planned: do it now, not at the next interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self._stop_timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._run_once()
            except Exception:
                log.exception("records.loop_error", loop=self._name)


def cancel_open(session: Session, work: type[RecordRetrieval] | type[ReportReturn], case_id: str) -> None:
    """The case was cancelled: its work of this kind not yet done is not done (the caller commits)."""
    waiting = session.exec(
        select(work).where(
            col(work.case_id) == case_id,
            col(work.status).in_([RetrievalStatus.PENDING, RetrievalStatus.RUNNING]),
        )
    ).all()
    for row in waiting:
        row.status, row.finished_at, row.last_error = (
            RetrievalStatus.CANCELLED,
            utcnow(),
            "the case was cancelled",
        )
        session.add(row)
