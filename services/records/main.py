"""The records process: its API and DICOMweb, its `records` queue consumer, its outbox relay, the retrieval
loop with our C-STORE SCP (AE SECONDOPINION, also the Query/Retrieve SCP of configured workstations), the report return loop, and the loop answering storage
commitment requests."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.auth.signed_links import get_link_settings
from services.common.config import get_settings
from services.common.db import get_engine
from services.common.http import create_app
from services.common.runner import ServiceRuntime, serve
from services.records import api, consumer, dicomweb, export, header_probe, timeline, workstations
from services.records.commitment_scp import CommitmentLoop
from services.records.limits import get_limits
from services.records.models import RecordRetrieval, ReportReturn
from services.records.qido_keys import QueryKeysByKeyword
from services.records.qr_scp import QueryRetrieve, get_qr_settings
from services.records.report_return import ReturnLoop, answer_commitment_result
from services.records.retrieval import (
    RetrievalLoop,
    get_retrieval_settings,
    require_dimse_safe_for_production,
)
from services.records.viewer_cors import ViewerCors

settings = get_settings()
runtime = ServiceRuntime(service="records", engine=lambda: get_engine("records"), handle=consumer.handle)
api.on_outbox_written(runtime.wake_relay)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    require_dimse_safe_for_production(settings, get_retrieval_settings())
    if settings.env == "prod" and (problems := get_link_settings().production_problems()):
        raise SystemExit("refusing to start with ENV=prod:\n- " + "\n- ".join(problems))
    async with runtime.lifespan()(app):  # migrations run here, before the retrieval loop reads its tables
        engine = get_engine("records")
        commitments = CommitmentLoop(engine, settings)
        commitments.start()
        handlers = commitments.handlers(lambda event: answer_commitment_result(engine, event))
        query_retrieve = QueryRetrieve(
            engine, get_engine("auth"), settings, get_qr_settings(), get_retrieval_settings().scp_tls_client()
        )
        retrieval = RetrievalLoop(engine, settings, commitment=handlers, query_retrieve=query_retrieve)
        retrieval.start()
        runtime.on_commit(retrieval.wake, wrote=RecordRetrieval)
        returns = ReturnLoop(get_engine("records"), settings)
        returns.start()
        runtime.on_commit(returns.wake, wrote=ReportReturn)
        limits = get_limits()
        if limits.parse_in_subprocess:
            header_probe.warm(limits.parse_memory_bytes)
        try:
            yield
        finally:
            retrieval.stop()
            returns.stop()
            commitments.stop()
            header_probe.shutdown()


app = create_app(
    "records",
    # Workstations first: `/v1/records/{case_id}` must not take `workstations` for a case id.
    routers=[workstations.router, api.router, export.router, timeline.router, dicomweb.router],
    engine=lambda: get_engine("records"),
    ready_checks=[runtime.broker_ready],
    lifespan=lifespan,
    max_body_bytes=None,  # uploads, STOW-RS and archives stream to disk and are bounded where they are read
)
app.add_middleware(QueryKeysByKeyword)
app.add_middleware(ViewerCors, origins=settings.viewer_origins)  # outermost: preflights need no key


def main() -> None:
    serve(app, settings.records_port)


if __name__ == "__main__":
    main()
