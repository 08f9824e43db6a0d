"""Settings: every one an environment variable with a default that works on a laptop."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# An origin as a browser sends it: scheme, host, optional port (RFC 6454).
ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")

# A development key, refused when ENV=prod. Base64 of 32 bytes.
DEV_CODEC_KEY = "ZGV2LW9ubHkta2V5LW5vdC1mb3ItcGhpLTMyYnl0ZXM="


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    env: str = "dev"
    data_dir: Path = PROJECT_ROOT / ".data"
    log_level: str = "INFO"
    # OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); spans are exported only when it is set.
    otel_exporter_otlp_endpoint: str | None = None

    # One database URL for all services; each service keeps its tables in its own schema
    # (PostgreSQL) or its own file (SQLite, the default when DATABASE_URL is unset).
    database_url: str | None = None
    # Connections per engine (each process holds one engine per schema it uses).
    database_pool_size: int = 10
    database_max_overflow: int = 10
    # A pooled connection idle longer than this is checked with a round trip before it is handed out
    # (a restarted or failed-over server closed it); one in steady use is not.
    database_ping_idle_seconds: float = 1.0

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    amqp_delivery_limit: int = 5
    amqp_prefetch: int = 16

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "cases"
    # Run the case workflow in the SDK's sandbox. The sandbox re-imports the workflow module for every case
    # the worker loads and runs every activation and payload through exec'd code: a quarter of the worker's
    # CPU in `make bench pipeline`. Its checks raise on non-deterministic calls, which the test suite (run
    # with it on) and the replay test catch before a change ships; in production such a call would stall
    # the case either way. Off by default; WORKFLOW_SANDBOX=true turns it on.
    workflow_sandbox: bool = False
    # The worker's Temporal SDK metrics for Prometheus (`host:port`, served at /metrics; unset: none), among them
    # temporal_workflow_task_execution_failed: a case whose workflow task fails (a nondeterminism error after an
    # unguarded change, a case input the worker cannot read) retries it for ever without it.
    worker_metrics_address: str | None = Field(
        default=None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$"
    )
    temporal_ui_port: int = 8233
    # Prometheus metrics of the local dev server (`start-dev --metrics-port`); 0 lets the server pick a port.
    temporal_metrics_port: int = 0
    # TLS (mTLS when a client certificate is given) to the Temporal frontend; required when ENV=prod.
    temporal_tls: bool = False
    temporal_tls_ca_path: Path | None = None
    temporal_tls_cert_path: Path | None = None
    temporal_tls_key_path: Path | None = None

    codec_key_id: str = "dev"
    codec_key: str = DEV_CODEC_KEY
    codec_old_keys: dict[str, str] = Field(default_factory=dict)

    # Codec server: lets the Temporal UI and CLI decode payloads for authorized staff.
    codec_server_port: int = 8888
    codec_server_token: str = ""  # required when set (always in prod): `Authorization: Bearer <token>`
    codec_server_origins: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8233", "http://localhost:8233"]
    )

    # Browser viewers (OHIF Viewer) on other origins that may read records' DICOMweb with a specialist's key:
    # each an origin ("https://viewer.example.org", scheme, host and port only), separated by commas (or a
    # JSON list). Empty: no CORS at all.
    viewer_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The payer sandbox (tests/payer_sandbox) that make demo starts for the X12 path.
    payer_sandbox_port: int = 8090

    intake_port: int = 8001
    records_port: int = 8002
    insurance_port: int = 8003
    review_port: int = 8004
    host: str = "127.0.0.1"
    # How long an idle client connection is kept open. Longer than clients keep theirs (httpx and Node: 5 s),
    # so a client never reuses a connection the server is just closing (a POST lost to a ReadError).
    http_keep_alive_seconds: int = 75

    intake_url: str = "http://127.0.0.1:8001"
    records_url: str = "http://127.0.0.1:8002"
    insurance_url: str = "http://127.0.0.1:8003"
    review_url: str = "http://127.0.0.1:8004"

    # Outbound webhooks: enabled endpoints a partner may have at once (each costs a lane and an attempt per
    # event); one more is refused with 409 until one is deleted.
    webhook_endpoints_per_partner: int = Field(default=10, ge=1)
    # FHIR Subscriptions a partner may have on (not off) at once; one more is refused with 409.
    fhir_subscriptions_per_partner: int = Field(default=10, ge=1)
    # HL7 v2 (ORU^R01 over MLLP): an operations API key intake's sender reads each report with from the review
    # service (its DiagnosticReport and signed PDF, at the URLs the case API links). Unset, each attempt to send to a
    # partner's MLLP endpoint fails saying so, and is retried on the webhook schedule.
    intake_report_key: SecretStr | None = None
    # HL7 v2 orders in (ORM^O01, OMG^O19 over MLLP, services.intake.hl7_in): the listener's TCP port; unset, no
    # listener. It binds HOST. Outside development it speaks TLS only and asks every interface engine for a client
    # certificate issued by a CA in INTAKE_MLLP_CLIENT_CAS (a PEM bundle); the certificate and key it serves are
    # INTAKE_MLLP_TLS_CERT and INTAKE_MLLP_TLS_KEY (PEM). In development, without them, plain MLLP from loopback.
    intake_mllp_port: int | None = Field(default=None, ge=0, le=65535)
    intake_mllp_tls_cert: Path | None = None
    intake_mllp_tls_key: Path | None = None
    intake_mllp_client_cas: Path | None = None

    # Records: a file larger than this is refused before it is stored.
    max_upload_bytes: int = 512 * 1024 * 1024

    # The review service's document-signing identity: every report PDF it issues (and each addendum's re-issue)
    # is a PAdES signature by it (services/review/report_signing.py). The key file is a PEM or DER private key
    # with the certificate (and the chain up to the root, without it) in the other two, or a PKCS#12 file
    # (.p12 / .pfx) holding all three. The passphrase opens an encrypted key or the PKCS#12 file. Required when
    # ENV=prod; in development a key and certificate made once under DATA_DIR/review/signing are used.
    review_report_signing_key_file: Path | None = None
    review_report_signing_cert_file: Path | None = None
    review_report_signing_chain_file: Path | None = None
    review_report_signing_passphrase: SecretStr | None = None
    # The signature's /Location: the programme that issues the report.
    review_report_signing_location: str = "Second-opinion programme"
    # An RFC 3161 timestamp authority: with it the signature is PAdES B-T (a trusted time), else B-B.
    review_report_tsa_url: str | None = None

    @field_validator("viewer_origins", mode="before")
    @classmethod
    def _origins_only(cls, given: Any) -> list[str]:
        if isinstance(given, str):
            text = given.strip()
            given = json.loads(text) if text.startswith("[") else [o for o in text.split(",") if o.strip()]
        origins = [str(origin).strip() for origin in given]
        for origin in origins:
            if not ORIGIN.fullmatch(origin):
                raise ValueError(
                    "VIEWER_ORIGINS lists the origins a viewer is served from, each as scheme://host[:port] "
                    "with no path and no wildcard, separated by commas (VIEWER_ORIGINS=https://viewer.example.org); "
                    "one of them is not"
                )
        return [origin.lower() for origin in origins]

    def production_problems(self, uses_temporal: bool = True) -> list[str]:
        """What keeps these settings from being safe for PHI in production (empty when they are).

        Temporal TLS and the payload-codec key are asked only of processes that talk to Temporal."""
        problems = []
        url = self.database_url or ""
        if not url.startswith("postgresql") or not any(
            f"sslmode={mode}" in url for mode in ("require", "verify-ca", "verify-full")
        ):
            problems.append("DATABASE_URL must be PostgreSQL with sslmode=require, verify-ca or verify-full")
        if not self.amqp_url.startswith("amqps://"):
            problems.append("AMQP_URL must use amqps:// (TLS to RabbitMQ)")
        if uses_temporal and not self.temporal_tls:
            problems.append(
                "TEMPORAL_TLS must be true (with TEMPORAL_TLS_CA_PATH, and a client cert for mTLS)"
            )
        if uses_temporal and (self.codec_key == DEV_CODEC_KEY or self.codec_key_id == "dev"):
            problems.append(
                "CODEC_KEY and CODEC_KEY_ID must be set to a production key (not the development key)"
            )
        return problems + self.mllp_problems()

    def mllp_problems(self) -> list[str]:
        """What keeps intake's MLLP listener (when INTAKE_MLLP_PORT is set) from taking orders outside
        development: it needs its TLS certificate and key, and the CAs its partners' client certificates are
        checked against."""
        if self.intake_mllp_port is None or self.env == "dev":
            return []
        missing = [
            name
            for name, value in (
                ("INTAKE_MLLP_TLS_CERT", self.intake_mllp_tls_cert),
                ("INTAKE_MLLP_TLS_KEY", self.intake_mllp_tls_key),
                ("INTAKE_MLLP_CLIENT_CAS", self.intake_mllp_client_cas),
            )
            if value is None
        ]
        if not missing:
            return []
        return [
            f"INTAKE_MLLP_PORT is set, so intake listens for HL7 v2 orders: set {', '.join(missing)} (MLLP over "
            "TLS with client certificates; plain MLLP is for development only), or unset INTAKE_MLLP_PORT"
        ]

    def require_safe_for_production(self, uses_temporal: bool = True) -> None:
        """Refuse to start with ENV=prod unless every connection is encrypted and the codec key is real."""
        if self.env != "prod":
            return
        problems = self.production_problems(uses_temporal)
        if problems:
            raise SystemExit("refusing to start with ENV=prod:\n- " + "\n- ".join(problems))

    def service_dir(self, service: str) -> Path:
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path


@lru_cache
def get_settings() -> Settings:
    return Settings()
