"""One audit entry per instance a key reads, per time window: a viewer's reads of one image coalesced.

A browser viewer asks for each frame of a cine alone (OHIF: a 10 s clip at 30 frames a second is 300 requests),
and each request wrote its own entry, so one look at one clip was 300 rows that named no image. An auditor
(HIPAA access log, IHE ATNA "DICOM Instances Accessed") asks who accessed which study and instance when: the
first read of an instance by a key writes the entry, naming the study, series and instance; that key's further
reads of it (frames, metadata, the instance) within the window (`AUDIT_READ_WINDOW_SECONDS`, 10 minutes) are
that same access and write nothing. Another key's read, or a read after the window, is another access and
writes its own entry. Entries are never changed (the log is append-only and hash-chained), so the entry says
what it covers instead of counting.

The windows are kept in the process: replicas each write their own entry, so an access may show more than
once, never not at all. A read waits for the entry that covers it to be committed; if writing it failed, the
next read writes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class ReadWindowSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUDIT_")

    read_window_seconds: float = 600.0  # 0: every read its own entry


# Windows kept at most before expired ones are dropped (a key reading many studies for a day).
PRUNE_ABOVE = 10_000


@dataclass(eq=False)
class _Window:
    lock: threading.Lock = field(default_factory=threading.Lock)
    opened_at: float | None = None  # when its entry was committed (monotonic)


class ReadWindows:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._windows: dict[tuple[str, ...], _Window] = {}
        self._lock = threading.Lock()

    def enter(self, reader: tuple[str, ...], write_entry: Callable[[], None]) -> bool:
        """Call `write_entry` unless an entry written for `reader` (key, case, instance) is still open; whether
        it was called. Concurrent reads of one instance by one key wait for the one entry, not each its own."""
        if self.seconds <= 0:
            write_entry()
            return True
        with self._lock:
            if len(self._windows) > PRUNE_ABOVE:
                self._prune()
            window = self._windows.setdefault(reader, _Window())
        with window.lock:
            if window.opened_at is not None and self.clock() - window.opened_at < self.seconds:
                return False
            write_entry()  # raises (the read fails, nothing covers it) when the entry could not be written
            window.opened_at = self.clock()
            return True

    def _prune(self) -> None:
        now = self.clock()
        self._windows = {
            reader: window
            for reader, window in self._windows.items()
            if window.opened_at is None or now - window.opened_at < self.seconds
        }


@lru_cache
def get_read_windows() -> ReadWindows:
    return ReadWindows(ReadWindowSettings().read_window_seconds)
