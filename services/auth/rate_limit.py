"""Per-key rate limits: a token bucket for each API key, kept in the process.

Each service process holds its own buckets, so a key may use the rate on each service, and a restart
refills them; a shared store (Redis, PostgreSQL) would be needed for one limit across replicas.
Settings: `AUTH_RATE_PER_SECOND` (refill rate) and `AUTH_RATE_BURST` (bucket size); 0 turns it off.
`POST /auth/token` (SMART Backend Services) draws on a bucket per caller address before any key is known,
`AUTH_RATE_TOKEN_PER_SECOND` (5) and `AUTH_RATE_TOKEN_BURST` (100).

Image frames read through DICOMweb (`/dicomweb/.../frames/...`, also what a BulkDataURI names) draw on a
bucket of their own, `AUTH_RATE_IMAGES_PER_SECOND` and `AUTH_RATE_IMAGES_BURST`: a browser viewer asks for each
frame of a cine alone, 25 at a time, and a 10 s clip is 300 frames, a study several such clips. On the API's
bucket (200) a viewer got 429s part way through the first long clip, and the cine stalled on missing frames.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


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


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


@lru_cache
def get_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return RateLimiter(settings.per_second, settings.burst)


@lru_cache
def get_image_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return RateLimiter(settings.images_per_second, settings.images_burst)


@lru_cache
def get_token_rate_limiter() -> RateLimiter:
    settings = RateLimitSettings()
    return RateLimiter(settings.token_per_second, settings.token_burst)


def reads_image_frames(method: str, path: str) -> bool:
    """Whether a request reads image frames through DICOMweb (the image bucket's requests): frames, rendered
    images and thumbnails (a study list's thumbnails, a cine rendered frame by frame) and WADO-URI."""
    return (
        method in ("GET", "HEAD")
        and path.startswith("/dicomweb/")
        and ("/frames/" in path or path.endswith(("/rendered", "/thumbnail")) or path == "/dicomweb/wado")
    )
