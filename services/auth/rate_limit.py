"""Per-key rate limits: a token bucket for each API key, one for every replica of every service.

Settings: `AUTH_RATE_PER_SECOND` (refill rate) and `AUTH_RATE_BURST` (bucket size); 0 turns it off.
`POST /auth/token` (SMART Backend Services) draws on a bucket per caller address before any key is known,
`AUTH_RATE_TOKEN_PER_SECOND` (5) and `AUTH_RATE_TOKEN_BURST` (100).

Image frames read through DICOMweb (`/dicomweb/.../frames/...`, also what a BulkDataURI names) draw on a
bucket of their own, `AUTH_RATE_IMAGES_PER_SECOND` and `AUTH_RATE_IMAGES_BURST`: a browser viewer asks for each
frame of a cine alone, 25 at a time, and a 10 s clip is 300 frames, a study several such clips. On the API's
bucket (200) a viewer got 429s part way through the first long clip, and the cine stalled on missing frames.

The buckets are shared through the auth database (`rate_buckets`, a row per kind and key: the tokens left and
the last refill, by the database's clock), so every process of every service on that database draws on the same
bucket (a key documented at 50 a second gets 50, not 50 per replica and service), and a restart does not refill
it. A process does not ask the database per request: it takes a grant of tokens with one atomic statement (insert
or update the row: refill by the time elapsed, cap at the burst, take what was asked or the whole tokens there
are) and spends them itself. A key's first grant is one token; a grant spent asks for twice as many next, up to
a twentieth of the burst (10 of the API's 200); a grant not spent within GRANT_SECONDS is given up, and the next
asks for what that one served. So a quiet key costs a round trip per request (0.25 ms here), a busy key one per
ten requests, and the tokens a replica holds unspent are few and gone within a second: the limit is never
exceeded, and a key gets at worst a few tokens less than it. The table is UNLOGGED (no WAL to flush per grant):
a database crash or failover empties it, every bucket full again. When the shared bucket is empty the answer is the wait for its next token (the
429's Retry-After), and the process refuses that key without asking again until then.

If the auth database cannot be reached, or has no `rate_buckets` yet, a process falls back to buckets of its
own (each full at first, as before this was shared): a warning is logged (the bucket's kind and the error's
class; no key, no address), nothing is refused for it, and the database is tried again after
RETRY_SHARED_SECONDS. On SQLite (a laptop: one process) the buckets are always the process's.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

import psycopg
import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.common.db import get_engine

log = structlog.get_logger(__name__)

# Tokens a process holds of a shared bucket are given up after this long unspent (a replica that stopped
# seeing the key does not keep them), and a grant is at most a GRANT_SHARE-th of the burst.
GRANT_SECONDS = 1.0
GRANT_SHARE = 20
# After the auth database failed a grant, the process's own buckets are used this long before it is tried again.
RETRY_SHARED_SECONDS = 30.0
# Keys remembered at most before those holding nothing are dropped (the token bucket's addresses).
PRUNE_ABOVE = 10_000
# A bucket's row untouched this long (and at least until it would be full again) is deleted: a full bucket
# and no row are the same. One grant in SWEEP_EVERY does it.
IDLE_ROW_SECONDS = 600.0
SWEEP_EVERY = 500


class RateLimitSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_RATE_")

    per_second: float = 50.0
    burst: int = 200
    # A study's frames (20 clips of 300 frames) at once; cheap reads of a case the key may see.
    images_per_second: float = 500.0
    images_burst: int = 6000
    # The SMART token endpoint, per caller address: a token lasts 300 s, so a client needs one every few minutes;
    # each attempt costs a signature check, and an unauthenticated caller must not make it cost more.
    token_per_second: float = 5.0
    token_burst: int = 100


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Buckets kept in this process: what a SharedRateLimiter falls back to, and what tests give a service."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token for `key`: 0 when allowed, else the seconds until a token is available."""
        if self.per_second <= 0 or self.burst <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(key, _Bucket(float(self.burst), now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.per_second


# One statement, one row lock: concurrent grants of a key take turns, each seeing what the one before left.
# The clock is the database's (one for every replica); refill by the time elapsed, cap at the burst, take what
# was asked or the whole tokens there are; `granted` says which (RETURNING gives the row as written).
TAKE = """
    INSERT INTO rate_buckets AS b (kind, key, tokens, granted, refilled_at)
    VALUES (%(kind)s, %(key)s, CAST(%(burst)s AS double precision) - %(want)s, %(want)s,
            CAST(extract(epoch FROM statement_timestamp()) AS double precision))
    ON CONFLICT (kind, key) DO UPDATE SET (tokens, granted, refilled_at) = (
        SELECT bucket.available - grant_.tokens, grant_.tokens, greatest(b.refilled_at, clock.now)
        FROM (SELECT CAST(extract(epoch FROM statement_timestamp()) AS double precision) AS now) AS clock,
            LATERAL (
                SELECT least(CAST(%(burst)s AS double precision),
                             b.tokens + greatest(0, clock.now - b.refilled_at) * CAST(%(rate)s AS double precision))
                AS available
            ) AS bucket,
            LATERAL (SELECT least(CAST(%(want)s AS integer), floor(bucket.available)) AS tokens) AS grant_
    )
    RETURNING granted, tokens
"""
SWEEP = """
    DELETE FROM rate_buckets
    WHERE kind = %(kind)s AND refilled_at < extract(epoch FROM statement_timestamp()) - CAST(%(idle)s AS double precision)
"""


@dataclass(eq=False)
class _Grant:
    """The tokens of one key's shared bucket this process holds."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: int = 0
    size: int = 0  # the last grant's tokens
    expires: float = 0.0
    refused_until: float = 0.0  # the shared bucket was empty: no token is back before this


class SharedRateLimiter(RateLimiter):
    """A bucket per key in the auth database, shared by every process (see the module's docstring); the
    process's own buckets (RateLimiter) while the database cannot be reached."""

    def __init__(self, kind: str, per_second: float, burst: int, engine: Callable[[], Engine]) -> None:
        super().__init__(per_second, burst)
        self.kind = kind
        self.engine = engine
        self.max_grant = max(1, burst // GRANT_SHARE)
        self._grants: dict[str, _Grant] = {}
        self._local_until = 0.0  # the shared buckets are not tried before this (time.monotonic)
        self._taken = 0

    def acquire(self, key: str) -> float:
        """Take one token for `key`: 0 when allowed, else the seconds until a token is available."""
        if self.per_second <= 0 or self.burst <= 0:
            return 0.0
        if self._local_until and time.monotonic() < self._local_until:
            return super().acquire(key)
        grant = self._grants.get(key)
        if grant is None:
            with self._lock:
                if len(self._grants) > PRUNE_ABOVE:
                    self._prune()
                grant = self._grants.setdefault(key, _Grant())
        with grant.lock:
            now = time.monotonic()
            if grant.tokens and now < grant.expires:
                grant.tokens -= 1
                return 0.0
            if now < grant.refused_until:
                return grant.refused_until - now
            try:
                return self._take(key, grant)
            except (SQLAlchemyError, psycopg.Error) as error:
                self._fall_back(error)
        return super().acquire(key)

    def _take(self, key: str, grant: _Grant) -> float:
        """Ask the shared bucket for a grant and spend one of its tokens, or say how long until one is back."""
        engine = self.engine()
        if engine.dialect.name != "postgresql":
            self._local_until = math.inf
            return super().acquire(key)
        want = min(self.burst, self._grant_size(grant))
        params = {
            "kind": self.kind,
            "key": key[:100],
            "want": want,
            "burst": self.burst,
            "rate": self.per_second,
        }
        granted, left = self._grant(engine, params)
        now = time.monotonic()
        if granted >= 1:
            grant.tokens, grant.size, grant.expires = granted - 1, granted, now + GRANT_SECONDS
            return 0.0
        wait = (1 - left) / self.per_second
        grant.refused_until = now + wait
        return wait

    def _grant(self, engine: Engine, params: dict[str, object]) -> tuple[int, float]:
        """The TAKE statement, in autocommit (it is its own transaction: no BEGIN and COMMIT round trips), on
        the pooled connection's psycopg connection: through SQLAlchemy's execution a grant took twice as long
        (0.45 against 0.25 ms here), and a quiet key pays one per request."""
        pooled = engine.raw_connection()
        try:
            driver = cast(psycopg.Connection[tuple[Any, ...]], pooled.driver_connection)
            driver.autocommit = True
            granted, left = driver.execute(TAKE, params).fetchone() or (0, 0.0)  # RETURNING: always a row
            if self._sweep_due():
                idle = max(IDLE_ROW_SECONDS, self.burst / self.per_second)
                driver.execute(SWEEP, {"kind": self.kind, "idle": idle})
            driver.autocommit = False
        except psycopg.Error:
            pooled.invalidate()  # in an unknown state: not back to the pool
            raise
        finally:
            pooled.close()
        return int(granted), float(left)

    def _grant_size(self, grant: _Grant) -> int:
        if grant.size == 0:
            return 1
        if grant.tokens == 0:  # the last grant was spent: this key is busy here
            return min(self.max_grant, grant.size * 2)
        return max(1, grant.size - grant.tokens)  # it expired unspent: what it served in GRANT_SECONDS

    def _sweep_due(self) -> bool:
        with self._lock:
            self._taken += 1
            return self._taken % SWEEP_EVERY == 0

    def _fall_back(self, error: Exception) -> None:
        with self._lock:
            if time.monotonic() < self._local_until:
                return  # another thread already did
            self._local_until = time.monotonic() + RETRY_SHARED_SECONDS
        log.warning(
            "rate_limit.shared_buckets_unavailable",
            kind=self.kind,
            error=type(error).__name__,
            local_for_seconds=RETRY_SHARED_SECONDS,
        )

    def _prune(self) -> None:
        now = time.monotonic()
        self._grants = {k: g for k, g in self._grants.items() if now < max(g.expires, g.refused_until)}


def auth_database() -> Engine:
    return get_engine("auth")


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


@lru_cache
def get_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return SharedRateLimiter("api", settings.per_second, settings.burst, auth_database)


@lru_cache
def get_image_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return SharedRateLimiter("images", settings.images_per_second, settings.images_burst, auth_database)


@lru_cache
def get_token_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return SharedRateLimiter("token", settings.token_per_second, settings.token_burst, auth_database)


def reads_image_frames(method: str, path: str) -> bool:
    """Whether a request reads image frames through DICOMweb (the image bucket's requests): frames, rendered
    images and thumbnails (a study list's thumbnails, a cine rendered frame by frame) and WADO-URI."""
    return (
        method in ("GET", "HEAD")
        and path.startswith("/dicomweb/")
        and ("/frames/" in path or path.endswith(("/rendered", "/thumbnail")) or path == "/dicomweb/wado")
    )
