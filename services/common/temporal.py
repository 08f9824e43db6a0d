"""Temporal client with the pydantic data converter and the encrypting payload codec.

Workflow and activity payloads carry PHI, so every payload is AES-GCM encrypted; the key id travels in
the payload metadata so keys can rotate (old keys stay readable through `CODEC_OLD_KEYS`).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import TLSConfig

from services.common.config import Settings, get_settings

ENCODING = b"binary/encrypted"

CASE_STATUS = SearchAttributeKey.for_keyword("CaseStatus")
CASE_URGENCY = SearchAttributeKey.for_keyword("CaseUrgency")
SUBSPECIALTY = SearchAttributeKey.for_keyword("Subspecialty")
PARTNER_ID = SearchAttributeKey.for_keyword("PartnerId")
ASSIGNED_REVIEWER = SearchAttributeKey.for_keyword("AssignedReviewer")
CASE_DUE_AT = SearchAttributeKey.for_datetime("CaseDueAt")

SEARCH_ATTRIBUTES: Sequence[SearchAttributeKey] = (
    CASE_STATUS,
    CASE_URGENCY,
    SUBSPECIALTY,
    PARTNER_ID,
    ASSIGNED_REVIEWER,
    CASE_DUE_AT,
)


def sqlite_flags() -> list[str]:
    """`--sqlite-pragma` flags for a `temporal server start-dev` kept in a file.

    Write-ahead logging with `synchronous=normal` survives the server being killed (only an OS crash can
    lose the last transactions); the default rollback journal syncs every write and measured 2.5x slower
    (13.8 vs 34.2 small workflows/s here, the same as the in-memory store), which starved the worker of
    workflow tasks once a few thousand cases were open.
    """
    return ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]


def cache_flags() -> list[str]:
    """`--dynamic-config-value` flags that give `temporal server start-dev` the caches a production server has.

    The CLI turns `system.forceSearchAttributesCacheRefreshOnRead` on, so that a search attribute added while
    the server runs shows at once. Then every start, upsert and visibility write reads the cluster metadata,
    and the namespace, from SQLite again, on the server's one database connection that every write also
    waits for: per case created, 14 reads of the cluster metadata and 7 of the namespace in its history
    service, against 6 history writes. The stack, the chaos harness and the test suite register their search
    attributes when the server starts (`search_attribute_flags`), before anything reads them, so the
    server's own caches (60 s for search attributes, 10 s for namespaces) serve them as in production.
    """
    return ["--dynamic-config-value", "system.forceSearchAttributesCacheRefreshOnRead=false"]


def search_attribute_flags() -> list[str]:
    """`--search-attribute` flags for `temporal server start-dev`."""
    flags = []
    for key in SEARCH_ATTRIBUTES:
        kind = "Datetime" if key.indexed_value_type.name == "DATETIME" else "Keyword"
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags


class EncryptionCodec(PayloadCodec):
    def __init__(self, key_id: str, key: bytes, old_keys: dict[str, bytes] | None = None) -> None:
        self.key_id = key_id
        self._encryptor = AESGCM(key)
        self._decryptors = {key_id: self._encryptor, **{k: AESGCM(v) for k, v in (old_keys or {}).items()}}

    @classmethod
    def from_settings(cls, settings: Settings) -> EncryptionCodec:
        return cls(
            settings.codec_key_id,
            base64.b64decode(settings.codec_key),
            {k: base64.b64decode(v) for k, v in settings.codec_old_keys.items()},
        )

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decrypt(p) for p in payloads]

    def _encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(12)
        sealed = self._encryptor.encrypt(nonce, payload.SerializeToString(), None)
        return Payload(
            metadata={"encoding": ENCODING, "encryption-key-id": self.key_id.encode()},
            data=nonce + sealed,
        )

    def _decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get("encryption-key-id", b"").decode()
        decryptor = self._decryptors.get(key_id)
        if decryptor is None:
            raise ValueError(f"payload encrypted with unknown key id {key_id!r}; add it to CODEC_OLD_KEYS")
        plain = decryptor.decrypt(payload.data[:12], payload.data[12:], None)
        return Payload.FromString(plain)


def data_converter(settings: Settings | None = None) -> DataConverter:
    """Pydantic payloads, encrypted. Failures too: their message and stack trace go into the failure's encoded
    attributes, encrypted like any payload (Temporal shows "Encoded failure" without the codec server), since
    an exception's message may quote the values that caused it (a pydantic `input_value` is PHI)."""
    settings = settings or get_settings()
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec.from_settings(settings),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect_temporal(
    settings: Settings | None = None, *, interceptors: Iterable = (), runtime: Runtime | None = None
) -> Client:
    """`runtime`: the SDK runtime the client (and a worker on it) runs in; None is the SDK's default."""
    from services.common.tracing import temporal_interceptors

    settings = settings or get_settings()
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
        interceptors=[*temporal_interceptors(), *interceptors],
        tls=tls_config(settings),
        runtime=runtime,
    )


def metrics_runtime(address: str) -> Runtime:
    """An SDK runtime whose metrics (workflow tasks, activities, pollers, the sticky cache) Prometheus scrapes at
    http://{address}/metrics, counters named as Prometheus expects (`…_total`)."""
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=address, counters_total_suffix=True, durations_as_seconds=True
            )
        )
    )


def tls_config(settings: Settings) -> TLSConfig | bool:
    if not settings.temporal_tls:
        return False

    def read(path: object) -> bytes | None:
        return open(path, "rb").read() if path else None  # type: ignore[call-overload]

    return TLSConfig(
        server_root_ca_cert=read(settings.temporal_tls_ca_path),
        client_cert=read(settings.temporal_tls_cert_path),
        client_private_key=read(settings.temporal_tls_key_path),
    )
