"""`Idempotency-Key` on every POST: the first answer is stored per caller and key, and replayed.

A request claims its key by inserting the row before it runs; a concurrent duplicate waits for the first
to finish and gets its answer, so ten identical POSTs racing make one case. The same key with another
body is refused. A request that fails releases its key, so the partner can retry with it; the claim of a
request that died is taken over by one retry.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from services.intake.models import IdempotencyRecord

# A claim older than this belongs to a request that died mid-way; a new request may take it over.
STALE_AFTER = timedelta(minutes=2)
WAIT_FOR_FIRST_SECONDS = 15.0


class KeyReusedWithOtherBody(Exception):
    """The key was first used with another request; a 422 to the caller."""


class StillRunning(Exception):
    """The first request with this key has not finished yet; a 409 to the caller, who retries."""


@dataclass(frozen=True)
class StoredAnswer:
    status_code: int
    body: Any


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


def claim(engine: Engine, owner: str, key: str, print_: str) -> StoredAnswer | None:
    """None when this request owns the key and must run; the stored answer when it already ran."""
    deadline = time.monotonic() + WAIT_FOR_FIRST_SECONDS
    while True:
        with Session(engine) as session:
            session.add(IdempotencyRecord(owner=owner, key=key, fingerprint=print_))
            try:
                session.commit()
                return None
            except IntegrityError:
                session.rollback()
            row = session.get(IdempotencyRecord, (owner, key))
            if row is None:
                continue  # released in between: try to claim again
            if row.fingerprint != print_:
                raise KeyReusedWithOtherBody
            if row.status_code is not None:
                return StoredAnswer(row.status_code, json.loads(row.response_json or "null"))
            created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
            if datetime.now(UTC) - created > STALE_AFTER:
                if _take_over(session, owner, key, row.created_at):
                    return None
                continue  # another request took it over first: wait for its answer
        if time.monotonic() > deadline:
            raise StillRunning
        time.sleep(0.05)


def _take_over(session: Session, owner: str, key: str, claimed_at: datetime) -> bool:
    """Claim the key again, if it still holds the stale claim read (claimed at `claimed_at`): of requests that
    read it together, exactly one takes it over (deleting it instead let a late one delete the new claim)."""
    taken = session.execute(
        update(IdempotencyRecord)
        .where(
            col(IdempotencyRecord.owner) == owner,
            col(IdempotencyRecord.key) == key,
            col(IdempotencyRecord.status_code).is_(None),
            col(IdempotencyRecord.created_at) == claimed_at,
        )
        .values(created_at=datetime.now(UTC))
    )
    session.commit()
    return int(getattr(taken, "rowcount", 0) or 0) == 1


def complete(engine: Engine, owner: str, key: str, status_code: int, body: Any) -> None:
    with Session(engine) as session:
        row = session.get(IdempotencyRecord, (owner, key))
        if row is not None:
            row.status_code = status_code
            row.response_json = json.dumps(body)
            session.add(row)
            session.commit()


def release(engine: Engine, owner: str, key: str) -> None:
    with Session(engine) as session:
        row = session.get(IdempotencyRecord, (owner, key))
        if row is not None and row.status_code is None:
            session.delete(row)
            session.commit()


# Standard Webhooks asks receivers to remember ids for at least the sender's retry window (we keep 7 days).
KEEP_FOR = timedelta(days=7)


def purge(engine: Engine, now: datetime | None = None) -> int:
    """Forget answers older than KEEP_FOR; returns how many were removed."""
    cutoff = (now or datetime.now(UTC)) - KEEP_FOR
    with Session(engine) as session:
        result = session.execute(
            delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < cutoff)  # type: ignore[arg-type]
        )
        session.commit()
        return int(getattr(result, "rowcount", 0) or 0)
