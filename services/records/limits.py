"""Limits on what one import may contain: the defences against hostile CDs and archives.

Every limit is an environment variable with the prefix `RECORDS_` (e.g. `RECORDS_MAX_ARCHIVE_MEMBERS`).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class ImportLimits(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_", extra="ignore")

    max_archive_members: int = 5000
    max_archive_total_bytes: int = 4 * 1024**3
    max_compression_ratio: int = 200
    max_dicomdir_bytes: int = 16 * 1024**2
    # Rows x Columns x Frames x Samples x BitsAllocated/8 of one instance, as its header declares it.
    max_pixel_bytes: int = 2 * 1024**3
    # Everything before the pixel data (an ultrasound header is kilobytes; an encapsulated PDF report a few
    # megabytes): read whole each time an instance is handed out, so bounded.
    max_header_bytes: int = 64 * 1024**2
    # Headers of uploaded files are parsed in worker processes with these limits.
    parse_in_subprocess: bool = True
    parse_timeout_seconds: float = 20.0
    parse_memory_bytes: int = 1024**3


@lru_cache
def get_limits() -> ImportLimits:
    return ImportLimits()
