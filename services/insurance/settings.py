"""The insurance service's own settings (environment variables prefixed `INSURANCE_`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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


@lru_cache
def get_insurance_settings() -> InsuranceSettings:
    return InsuranceSettings()
