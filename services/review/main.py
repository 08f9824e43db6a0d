"""The review process: migrations, its consumer and outbox relay, the loop that settles specialists' access to
cases, and the HTTP API on `review_port`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.review import access, api, consumer, deps

settings = get_settings()
runtime = ServiceRuntime(service="review", engine=lambda: get_engine("review"), handle=consumer.handle)
deps.relay.wake = runtime.wake_relay


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with runtime.lifespan()(app):  # migrations run here, before the loop reads its table
        settling = access.SettlingLoop(get_engine("review"), get_engine("auth"))
        settling.start()
        try:
            yield
        finally:
            settling.stop()


app = create_app(
    "review",
    routers=[api.router],
    engine=lambda: get_engine("review"),
    ready_checks=[runtime.broker_ready],
    lifespan=lifespan,
)


def main() -> None:
    serve(app, settings.review_port)


if __name__ == "__main__":
    main()
