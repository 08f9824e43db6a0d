"""The records process: its API, its `records` queue consumer and its outbox relay."""

from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.records import api, consumer

settings = get_settings()
runtime = ServiceRuntime(service="records", engine=lambda: get_engine("records"), handle=consumer.handle)
api.on_outbox_written(runtime.wake_relay)
app = create_app(
    "records",
    routers=[api.router],
    engine=lambda: get_engine("records"),
    ready_checks=[runtime.broker_ready],
    lifespan=runtime.lifespan(),
)


def main() -> None:
    serve(app, settings.records_port)


if __name__ == "__main__":
    main()
