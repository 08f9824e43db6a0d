"""Runs one service process: migrations, topology, its AMQP consumer and outbox relay, then its API."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from services.common import migrate
from services.common.amqp import Consumer, Handler, OutboxRelay, ensure_topology
from services.common.config import Settings, get_settings
from services.common.db import Outbox
from services.common.logging import configure_logging, get_logger
from services.common.tracing import configure_tracing

log = get_logger(__name__)


@dataclass
class ServiceRuntime:
    """The background parts of a service process; the app's lifespan starts and stops them."""

    service: str
    engine: Callable[[], Engine]
    handle: Handler | None
    settings: Settings = field(default_factory=get_settings)
    uses_temporal: bool = False  # intake starts workflows; the other services never talk to Temporal
    consumer: Consumer | None = None
    relay: OutboxRelay | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _commit_listeners: list[tuple[Callable[[], None], type | None]] = field(default_factory=list)

    def start(self) -> None:
        configure_logging(self.service, self.settings.log_level)
        self.settings.require_safe_for_production(self.uses_temporal)
        configure_tracing(self.service, self.settings)
        migrate.upgrade(self.service, self.engine())
        migrate.upgrade("auth")  # API keys, tenancy and the audit log, shared by every service
        ensure_topology(self.settings)
        self.relay = OutboxRelay(settings=self.settings, engine=self.engine())
        self._spawn(self.relay.run_forever, "outbox-relay")
        if self.handle is not None:
            self.consumer = Consumer(
                settings=self.settings,
                queue=self.service,
                engine=self.engine(),
                handle=self.handle,
                on_commit=self._committed,
            )
            self._spawn(self.consumer.run_forever, "consumer")
        log.info("service.started", service=self.service)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{self.service}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        if self.consumer:
            self.consumer.stop()
        if self.relay:
            self.relay.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    def wake_relay(self) -> None:
        if self.relay:
            self.relay.wake()

    def on_commit(self, listener: Callable[[], None], wrote: type | None = None) -> None:
        """Also call `listener` after the consumer commits a message's changes (e.g. to wake a sender);
        with `wrote`, only after a message that added a row of that model."""
        self._commit_listeners.append((listener, wrote))

    def _committed(self) -> None:
        # Wake only who has new work: a drain or a claim that finds nothing still costs a transaction.
        written = self.consumer.last_written if self.consumer else frozenset()
        if Outbox in written:
            self.wake_relay()
        for listener, wrote in self._commit_listeners:
            if wrote is None or wrote in written:
                listener()

    def broker_ready(self) -> bool:
        return self.consumer is None or self.consumer.connected.is_set()

    def lifespan(self) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
        @asynccontextmanager
        async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
            self.start()
            try:
                yield
            finally:
                self.stop()

        return _lifespan


def serve(app: FastAPI, port: int, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    uvicorn.run(
        app,
        host=settings.host,
        port=port,
        log_level="warning",
        access_log=False,
        # Uvicorn's own handlers would print a failed request's traceback with its messages; its loggers
        # propagate to the root handler instead, which logs exceptions by outline (services.common.logging).
        log_config=None,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
