"""The codec server: the Temporal UI and CLI send encrypted payloads here to show them to authorized staff.

Protocol (Temporal's remote codec): POST /decode and POST /encode with a `Payloads` message as protobuf JSON.
Every call needs `Authorization: Bearer <CODEC_SERVER_TOKEN>` when a token is configured (always in prod);
the UI's origin must be listed in CODEC_SERVER_ORIGINS.

    python -m services.common.codec_server      (make codec-server)
    temporal workflow show -w case-<id> --codec-endpoint http://127.0.0.1:8888 [--codec-auth 'Bearer <token>']
"""

from __future__ import annotations

import hmac

import structlog
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from services.common.config import Settings, get_settings
from services.common.http import NO_NATIVE_TELEMETRY
from services.common.logging import configure_logging
from services.common.runner import serve
from services.common.temporal import EncryptionCodec

log = structlog.get_logger(__name__)


def create_codec_app(settings: Settings) -> FastAPI:
    codec = EncryptionCodec.from_settings(settings)
    app = FastAPI(
        title="secondopinion codec server", docs_url=None, redoc_url=None, telemetry=NO_NATIVE_TELEMETRY
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.codec_server_origins,
        allow_methods=["POST"],
        allow_headers=["content-type", "x-namespace", "authorization"],
        allow_credentials=True,
    )

    def authorize(request: Request) -> None:
        if not settings.codec_server_token:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent, f"Bearer {settings.codec_server_token}"):
            log.warning("codec.denied", path=request.url.path)
            raise HTTPException(
                401, "a valid `Authorization: Bearer <token>` is required to decode case payloads"
            )

    async def transform(request: Request, decode: bool) -> Response:
        authorize(request)
        try:
            payloads = json_format.Parse(await request.body(), Payloads())
        except json_format.ParseError as exc:
            raise HTTPException(400, "the body must be a Temporal Payloads message as protobuf JSON") from exc
        try:
            result = await (codec.decode if decode else codec.encode)(list(payloads.payloads))
        except Exception as exc:  # a tampered payload or an unknown key id
            raise HTTPException(
                422, f"could not {'decode' if decode else 'encode'}: {type(exc).__name__}"
            ) from exc
        log.info(
            "codec.used",
            action="decode" if decode else "encode",
            namespace=request.headers.get("x-namespace"),
        )
        body = json_format.MessageToJson(Payloads(payloads=result))
        return Response(body, media_type="application/json")

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        return await transform(request, decode=True)

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return await transform(request, decode=False)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "service": "codec-server"}

    return app


def main() -> None:
    settings = get_settings()
    configure_logging("codec-server", settings.log_level)
    settings.require_safe_for_production()
    if settings.env == "prod" and not settings.codec_server_token:
        raise SystemExit("CODEC_SERVER_TOKEN is required when ENV=prod: decoded payloads carry PHI")
    serve(create_codec_app(settings), settings.codec_server_port, settings)


if __name__ == "__main__":
    main()
