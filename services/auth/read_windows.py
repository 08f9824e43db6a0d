"""One audit entry per instance a key reads, per time window: a viewer's reads of one image coalesced.

A browser viewer asks for each frame of a cine alone (OHIF: a 10 s clip at 30 frames a second is 300 requests),
and each request wrote its own entry, so one look at one clip was 300 rows that named no image. An auditor
(HIPAA access log, IHE ATNA "DICOM Instances Accessed") asks who accessed which study and instance when: the
first read of an instance by a key in a window writes the entry, naming the study, series and instance; that
key's further reads of it (frames, metadata, the instance) in the same window are that same access and write
nothing. Another key's read, or a read in the next window, is another access and writes its own entry. Windows
are fixed slices of time (`AUDIT_READ_WINDOW_SECONDS`, 10 minutes, counted from the epoch), so every replica
agrees on which window a read falls in. Entries are never changed (the log is append-only and hash-chained), so
the entry says what it covers instead of counting.

The windows are shared by every replica through the database: the first read in a window inserts the window's
row (key, case, instance, window start; a unique key, insert-if-absent) and its entry in one transaction (the
audit log's group commit, `audit.record_once`, under the chain's lock), so a window has exactly one entry
whichever replica served its reads, and a window whose entry failed has no row (the next read writes both). Each process also remembers the windows it saw taken, so a cine's later frames
cost no round trip. A read waits for the entry that covers it to be committed. Expired windows' rows are
deleted (they are not the log; the entries stay).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from services.auth import audit
from services.auth.audit import EntryFields
from services.auth.models import ReadWindow


class ReadWindowSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUDIT_")

    read_window_seconds: float = 600.0  # 0: every read its own entry


# Windows remembered at most before expired ones are dropped (a key reading many studies for a day).
PRUNE_ABOVE = 10_000
# Expired rows are deleted by one write in this many (each a cheap indexed DELETE).
DELETE_EVERY = 200


@dataclass(eq=False)
class _Window:
    lock: threading.Lock = field(default_factory=threading.Lock)
    start: int | None = None  # the window this process saw taken (its entry committed, here or elsewhere)


class ReadWindows:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.seconds = seconds
        self.clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()
        self._writes = 0

    def window_start(self) -> int:
        return int(self.clock() // self.seconds * self.seconds)

    def enter(self, engine: Engine, reader: tuple[str, str, str], entry: EntryFields) -> bool:
        """Write `entry` unless the window of `reader` (key, case, instance) already has one, here or on another
        replica; whether this call wrote it. Concurrent reads of one instance by one key in this process wait
        for the one entry; the window's row and the entry are committed together (audit.record_once)."""
        if self.seconds <= 0:
            audit.record(engine, **entry)
            return True
        with self._lock:
            if len(self._windows) > PRUNE_ABOVE:
                self._prune()
            window = self._windows.setdefault(reader, _Window())
        with window.lock:
            start = self.window_start()
            if window.start == start:
                return False
            key_id, case_id, instance_uid = reader
            row = {
                "key_id": key_id,
                "case_id": case_id,
                "instance_uid": instance_uid[:64],
                "window_start": start,
            }
            wrote = audit.record_once(engine, row, **entry)  # raises: nothing covers the read
            window.start = start
        if wrote:
            self._delete_expired(engine, start)
        return wrote

    def _delete_expired(self, engine: Engine, start: int) -> None:
        with self._lock:
            self._writes += 1
            due = self._writes % DELETE_EVERY == 0
        if due:
            with Session(engine) as session:
                expired = start - int(self.seconds)
                session.execute(delete(ReadWindow).where(col(ReadWindow.window_start) < expired))
                session.commit()

    def _prune(self) -> None:
        start = self.window_start()
        self._windows = {reader: w for reader, w in self._windows.items() if w.start in (None, start)}


@lru_cache
def get_read_windows() -> ReadWindows:
    return ReadWindows(ReadWindowSettings().read_window_seconds)
