"""With ENV=prod every process refuses to start unless its connections are encrypted and the codec key is real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.common.config import Settings
from services.records.retrieval import RetrievalSettings
from tests.pki import Authority

SAFE = {
    "ENV": "prod",
    "DATABASE_URL": "postgresql://app@db.internal:5432/so?sslmode=verify-full",
    "AMQP_URL": "amqps://app:secret@mq.internal:5671/%2F",
    "TEMPORAL_TLS": "true",
    "CODEC_KEY_ID": "2026-11",
    "CODEC_KEY": "c2VjcmV0LXByb2R1Y3Rpb24ta2V5LTMyLWJ5dGVzISE=",
}

PROCESSES = [
    ["-m", "services.intake.main"],
    ["-m", "services.records.main"],
    ["-m", "services.insurance.main"],
    ["-m", "services.review.main"],
    ["-m", "workflows.worker"],
    ["-m", "services.common.codec_server"],
]


@pytest.mark.parametrize(
    ("unsafe", "problem"),
    [
        ({"DATABASE_URL": "postgresql://app@db.internal:5432/so"}, "sslmode"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"AMQP_URL": "amqp://app:secret@mq.internal:5672/%2F"}, "amqps://"),
        ({"TEMPORAL_TLS": "false"}, "TEMPORAL_TLS"),
        ({"CODEC_KEY_ID": "dev"}, "CODEC_KEY"),
    ],
)
def test_each_unsafe_setting_is_named(unsafe: dict[str, str], problem: str) -> None:
    env = {k.lower(): v for k, v in {**SAFE, **unsafe}.items()}
    problems = Settings(**env).production_problems()  # type: ignore[arg-type]
    assert len(problems) == 1 and problem in problems[0]


def test_services_without_temporal_need_neither_temporal_tls_nor_the_codec_key() -> None:
    env = {k.lower(): v for k, v in {**SAFE, "TEMPORAL_TLS": "false", "CODEC_KEY_ID": "dev"}.items()}
    assert Settings(**env).production_problems(uses_temporal=False) == []  # type: ignore[arg-type]
    assert len(Settings(**env).production_problems(uses_temporal=True)) == 2  # type: ignore[arg-type]


def test_safe_settings_have_no_problems() -> None:
    assert Settings(**{k.lower(): v for k, v in SAFE.items()}).production_problems() == []  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", PROCESSES, ids=[a[1] for a in PROCESSES])
def test_every_process_refuses_to_start_in_prod_on_plain_connections(argv: list[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "ENV": "prod",
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": "",
        "AMQP_URL": "amqp://x@127.0.0.1:1/",
        "RECORDS_SCP_HOST": "0.0.0.0",  # our C-STORE SCP taking plain DIMSE from the network
    }
    env.pop("CODEC_KEY", None)
    result = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to start with ENV=prod" in result.stderr + result.stdout
    assert "amqps://" in result.stderr + result.stdout
    if argv[1] == "services.records.main":
        assert "RECORDS_SCP_HOST 0.0.0.0 takes plain DIMSE" in result.stderr + result.stdout


def test_review_refuses_to_start_in_prod_without_a_report_signing_identity(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, **SAFE, "DATA_DIR": str(tmp_path)}
    env.pop("REVIEW_REPORT_SIGNING_KEY_FILE", None)
    result = subprocess.run(
        [sys.executable, "-m", "services.review.main"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "refusing to start with ENV=prod" in result.stderr + result.stdout
    assert "REVIEW_REPORT_SIGNING_KEY_FILE" in result.stderr + result.stdout
    assert not (tmp_path / "review" / "signing").exists()  # no development key made in production


def test_our_scp_taking_plain_dimse_from_the_network_is_named_unless_tls_only_or_a_vpn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ours = Authority(tmp_path, "hospital").issue("secondopinion", server=True)
    tls = {"scp_tls_port": 2762, "scp_tls_cert_path": ours.cert, "scp_tls_key_path": ours.key}
    [problem] = RetrievalSettings(scp_host="0.0.0.0").production_problems()
    assert (
        "RECORDS_SCP_HOST 0.0.0.0 takes plain DIMSE" in problem and "RECORDS_DIMSE_PLAIN_PROTECTED" in problem
    )
    assert RetrievalSettings(scp_host="127.0.0.1").production_problems() == []  # nothing from the network
    assert RetrievalSettings(scp_host="0.0.0.0", scp_plain=False, **tls).production_problems() == []
    assert RetrievalSettings(scp_host="0.0.0.0", dimse_plain_protected=True).production_problems() == []
    [unusable] = RetrievalSettings(scp_tls_port=2762, scp_tls_cert_path=ours.cert).production_problems()
    assert "RECORDS_SCP_TLS_KEY_PATH" in unusable
