"""DICOM headers of untrusted files parsed in worker processes with an address-space limit and a timeout,
so a hostile file can cost a worker, never the records process (its memory, its threads, its consumer)."""

from __future__ import annotations

import multiprocessing
import resource
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from services.records.classify import DicomHeader, Unusable, read_dicom_header

_lock = threading.Lock()
_pools: dict[int, ProcessPoolExecutor] = {}


def _limit_worker(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


WORKERS = 2


def _ready() -> None:
    """Nothing: running it makes a worker import the parser."""


def warm(memory_bytes: int) -> None:
    """Start the workers now, not at the first upload or retrieval: spawning one and importing pydicom
    takes about a second, which the first study after a restart would otherwise wait for."""
    pool = _pool(memory_bytes)
    for _ in range(WORKERS):
        pool.submit(_ready)


def _pool(memory_bytes: int) -> ProcessPoolExecutor:
    with _lock:
        pool = _pools.get(memory_bytes)
        if pool is None:
            # spawn: workers inherit none of this process's threads, sockets or database connections, and
            # they end with it (no server process outlives the service).
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(
                max_workers=WORKERS, mp_context=context, initializer=_limit_worker, initargs=(memory_bytes,)
            )
            _pools[memory_bytes] = pool
        return pool


def _discard_pool(memory_bytes: int, pool: ProcessPoolExecutor) -> None:
    with _lock:
        if _pools.get(memory_bytes) is pool:
            del _pools[memory_bytes]
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()  # a worker stuck on a hostile file is ended, not waited for
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)


def isolated_reader(*, memory_bytes: int, timeout: float) -> Callable[[Path], DicomHeader]:
    def read(path: Path) -> DicomHeader:
        pool = _pool(memory_bytes)
        future = pool.submit(read_dicom_header, path)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            _discard_pool(memory_bytes, pool)
            raise Unusable(
                "is a DICOM file whose header could not be read in time (it is malformed)"
            ) from None
        except BrokenProcessPool:
            _discard_pool(memory_bytes, pool)
            raise Unusable(
                "is a DICOM file whose header exhausted the parser's memory (it is malformed)"
            ) from None
        except MemoryError:
            raise Unusable(
                "is a DICOM file whose header exhausted the parser's memory (it is malformed)"
            ) from None

    return read


def shutdown() -> None:
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)
