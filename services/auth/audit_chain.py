"""The audit log's hash chain, and the verifier that finds a changed or removed entry.

Each entry's `row_hash` is SHA-256 over its fields and `prev_hash`, the `row_hash` of the entry before it.
Changing an entry breaks its own hash; removing one breaks the `prev_hash` link of the entry after it.
Removing the newest entries leaves a shorter valid chain: compare `head` with a copy kept elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.auth.models import AuditEvent

GENESIS = "0" * 64
HASHED_FIELDS = (
    "actor",
    "partner_id",
    "role",
    "service",
    "action",
    "resource",
    "case_id",
    "outcome",
    "purpose",
    "detail",
    "prev_hash",
)


def _instant(at: datetime) -> str:
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.isoformat(timespec="microseconds")


def entry_hash(event: AuditEvent) -> str:
    fields: dict[str, str | None] = {name: getattr(event, name) for name in HASHED_FIELDS}
    if (
        event.network_address is not None
    ):  # hashed only where there is one: entries before it hash as they did
        fields["network_address"] = event.network_address
    fields["at"] = _instant(event.at)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    entry_id: int
    reason: str


@dataclass
class ChainReport:
    entries: int = 0
    unchained: int = 0  # entries written before the chain existed (migration 0003)
    head: str = GENESIS
    breaks: list[ChainBreak] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.breaks


def verify(engine: Engine) -> ChainReport:
    """Walk the log in id order and report every entry whose hash or link does not hold."""
    report = ChainReport()
    previous: str | None = None
    with Session(engine) as session:
        rows = session.exec(select(AuditEvent).order_by(col(AuditEvent.id)).execution_options(yield_per=1000))
        for event in rows:
            report.entries += 1
            assert event.id is not None
            if event.row_hash is None and previous is None:
                report.unchained += 1
                continue
            expected_prev = previous or GENESIS
            if event.prev_hash != expected_prev:
                report.breaks.append(
                    ChainBreak(event.id, "prev_hash does not match the entry before: an entry was removed")
                )
            if event.row_hash != entry_hash(event):
                report.breaks.append(
                    ChainBreak(event.id, "the entry does not match its hash: it was changed")
                )
            previous = event.row_hash or ""
    report.head = previous or GENESIS
    return report
