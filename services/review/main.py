"""The review process: migrations, its consumer and outbox relay, and the HTTP API on `review_port`."""

from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.review import api, consumer, deps

settings = get_settings()
runtime = ServiceRuntime(service="review", engine=lambda: get_engine("review"), handle=consumer.handle)
deps.relay.wake = runtime.wake_relay
app = create_app(
    "review",
    routers=[api.router],
    engine=lambda: get_engine("review"),
    ready_checks=[runtime.broker_ready],
    lifespan=runtime.lifespan(),
)


def main() -> None:
    serve(app, settings.review_port)


if __name__ == "__main__":
    main()
