from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.insurance import api, consumer, fhir

settings = get_settings()
runtime = ServiceRuntime(service="insurance", engine=lambda: get_engine("insurance"), handle=consumer.handle)
app = create_app(
    "insurance",
    routers=[api.router, fhir.router],
    engine=lambda: get_engine("insurance"),
    ready_checks=[runtime.broker_ready],
    lifespan=runtime.lifespan(),  # type: ignore[arg-type]  # ServiceRuntime.lifespan is mis-annotated
)


def main() -> None:
    serve(app, settings.insurance_port)


if __name__ == "__main__":
    main()
