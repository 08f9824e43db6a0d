"""A background pass of the records process (retrievals, report returns): run when woken by a commit that
planned work, and every `interval` seconds for retries falling due; one thread, stopped cleanly."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

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
