"""The review process: migrations, its consumer and outbox relay, the loop that settles specialists' access to
cases, and the HTTP API on `review_port`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.review import access, api, consumer, deps, report_signing

settings = get_settings()
runtime = ServiceRuntime(service="review", engine=lambda: get_engine("review"), handle=consumer.handle)
deps.relay.wake = runtime.wake_relay


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if settings.env == "prod" and (signing := report_signing.signing_problems(settings)):
        # Named with the connection problems, if any: one start tells everything to fix.
        problems = settings.production_problems(uses_temporal=runtime.uses_temporal) + signing
        raise SystemExit("refusing to start with ENV=prod:\n- " + "\n- ".join(problems))
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
