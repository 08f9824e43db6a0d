"""The codec server decodes what the payload codec encrypted, for authorized callers only."""

from __future__ import annotations

from fastapi.testclient import TestClient
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from contracts.decisions import CancelCase
from services.common.codec_server import create_codec_app
from services.common.config import Settings
from services.common.temporal import data_converter

UI = "http://127.0.0.1:8233"


async def encrypted_body(settings: Settings, value: object) -> str:
    payloads = await data_converter(settings).encode([value])
    return json_format.MessageToJson(Payloads(payloads=payloads))


async def test_decode_returns_the_clear_payload_to_an_authorized_caller(settings: Settings) -> None:
    secured = settings.model_copy(update={"codec_server_token": "staff-token"})
    client = TestClient(create_codec_app(secured))
    body = await encrypted_body(secured, CancelCase(by="ops-1", reason="patient Zed Canary withdrew"))
    assert "Canary" not in body

    denied = client.post("/decode", content=body, headers={"authorization": "Bearer wrong"})
    assert denied.status_code == 401 and "Canary" not in denied.text

    decoded = client.post(
        "/decode", content=body, headers={"authorization": "Bearer staff-token", "x-namespace": "default"}
    )
    assert decoded.status_code == 200
    payload = json_format.Parse(decoded.text, Payloads()).payloads[0]
    assert payload.metadata["encoding"] == b"json/plain"
    assert b"Zed Canary" in payload.data


async def test_encode_then_decode_round_trips_and_garbage_is_a_4xx(settings: Settings) -> None:
    client = TestClient(create_codec_app(settings))
    plain = json_format.MessageToJson(
        Payloads(payloads=data_converter(settings).payload_converter.to_payloads(["x"]))
    )
    encoded = client.post("/encode", content=plain)
    assert encoded.status_code == 200 and "binary/encrypted" in str(
        json_format.Parse(encoded.text, Payloads())
    )
    assert client.post("/decode", content=encoded.text).status_code == 200
    assert client.post("/decode", content=b"{not json").status_code == 400


def test_the_ui_origin_may_call_it_and_others_may_not(settings: Settings) -> None:
    client = TestClient(create_codec_app(settings))
    preflight = {
        "origin": UI,
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-namespace",
    }
    assert client.options("/decode", headers=preflight).headers["access-control-allow-origin"] == UI
    other = dict(preflight, origin="http://evil.example")
    assert "access-control-allow-origin" not in client.options("/decode", headers=other).headers
