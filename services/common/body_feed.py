"""A request body handed, chunk by chunk, to blocking code in a worker thread while it still arrives.

The event loop keeps reading the socket (up to `BUFFERED_CHUNKS` ahead) while the thread writes, hashes
and fsyncs: receiving and storing overlap instead of taking turns. If the consumer stops early (it
refused the body), the rest of the body is still read and dropped, up to `drain_limit` bytes in all, so
the client, which sends its whole body before it reads, gets the answer instead of a broken connection.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterable, Callable, Iterator
from typing import TypeVar

import anyio.to_thread

T = TypeVar("T")
BUFFERED_CHUNKS = 32  # with the server's chunks of up to 256 KiB: at most 8 MiB held per upload
_END = b""  # never a chunk: the server's body iterator yields no empty ones to hand on


async def feed_to_thread(
    body: AsyncIterable[bytes], consume: Callable[[Iterator[bytes]], T], *, drain_limit: int
) -> T:
    """`consume(chunks)` in a worker thread, its chunks coming from `body`; a failure reading the body
    (the client went away) is raised in preference to what the consumer made of the truncated body."""
    # A plain thread-safe queue: the worker takes chunks without a round trip through the event loop,
    # and the loop only waits (in a thread of its own) when the worker has fallen 32 chunks behind.
    chunks: queue.Queue[bytes] = queue.Queue(BUFFERED_CHUNKS)
    consumed = threading.Event()
    body_failed: list[Exception] = []

    def put(chunk: bytes) -> None:
        while not consumed.is_set():
            try:
                chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    async def pump() -> None:
        read = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                read += len(chunk)
                if consumed.is_set():  # the consumer is done: read on, keep nothing
                    if read > drain_limit:
                        return
                    continue
                try:
                    chunks.put_nowait(chunk)
                except queue.Full:
                    await anyio.to_thread.run_sync(put, chunk)
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            body_failed.append(exc)
        finally:
            await anyio.to_thread.run_sync(put, _END)

    def run() -> T:
        try:
            return consume(iter(chunks.get, _END))
        finally:
            consumed.set()

    pumping = asyncio.ensure_future(pump())
    try:
        return await anyio.to_thread.run_sync(run)
    finally:
        await pumping  # the rest of the body is read (or dropped) before the answer goes out
        if body_failed:
            raise body_failed[0]  # in place of the consumer's view of a body cut short
