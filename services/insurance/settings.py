"""The insurance service's own settings (environment variables prefixed `INSURANCE_`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreLoginSetting(BaseModel):
    """One payer's CAQH CORE login, where it differs from the default `INSURANCE_CORE_*` one.

    The Connectivity Rule (vC2.2.0, §4.1) has two: UserName + Password, or an X.509 client certificate
    presented in the TLS handshake (PEM files: the certificate chain and its private key). A field left out
    is taken from the default login."""

    username: str | None = None
    password: SecretStr | None = None
    sender_id: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    ca_bundle: str | None = None


class InsuranceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSURANCE_", env_file=".env", extra="ignore")

    # A verification older than this is re-checked with the payer when insurance.verify comes again.
    verification_max_age_hours: float = 72.0
    # Transient payer failures (timeout, connection refused, AAA 42) are retried this often, with backoff.
    payer_attempts: int = 3
    payer_backoff_seconds: float = 0.5
    # The organization whose network status is checked at verification, and how it names itself in a 270.
    reviewing_organization: str = "SecondOpinion Reading Group"
    reviewing_npi: str = "1234567893"
    # ISA15 of every 270: "T" (test) until the trading partner agreement moves this sender to production.
    x12_usage_indicator: Literal["P", "T"] = "T"
    # The CAQH CORE connectivity login every 270 carries (UserName, Password, SenderID). The defaults are
    # the payer sandbox's (tests/payer_sandbox/members.json); a clearinghouse issues the real ones, and the
    # password belongs in a secret, never in a config map.
    core_username: str = "secondopinion"
    core_password: SecretStr = SecretStr("sandbox-only")
    core_sender_id: str = "SECONDOPINION"
    # The X.509 login instead of UserName + Password: PEM certificate (chain) and private key files. With a
    # certificate, the envelope carries no UserName / Password; the TLS handshake says who we are.
    core_client_cert: str = ""
    core_client_key: str = ""
    # The payers' server certificates are checked against this PEM bundle ("" = the system's trust store).
    core_ca_bundle: str = ""
    # Per payer (its payer_id), a login of its own, as JSON: {"SBX01": {"username": "…", "password": "…"}}
    # or {"BCBS": {"client_cert": "/secrets/bcbs.crt", "client_key": "/secrets/bcbs.key"}}. Payers not
    # named here get the default login above.
    core_logins: dict[str, CoreLoginSetting] = {}

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> InsuranceSettings:
        logins = {"INSURANCE_CORE_CLIENT_CERT/KEY": (self.core_client_cert, self.core_client_key)}
        for payer_id, login in self.core_logins.items():
            logins[f"INSURANCE_CORE_LOGINS[{payer_id!r}]"] = (login.client_cert or "", login.client_key or "")
        for name, (cert, key) in logins.items():
            if bool(cert) != bool(key):
                raise ValueError(
                    f"{name}: an X.509 login needs both the client certificate and its private key "
                    "(PEM files); give both, or neither to log in with UserName and Password"
                )
        return self


@lru_cache
def get_insurance_settings() -> InsuranceSettings:
    return InsuranceSettings()
