from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import Settings
from tests.infra import postgres_database, rabbitmq_vhost


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with rabbitmq_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at this session's own database and vhost; also exported for subprocesses."""
    data_dir: Path = tmp_path_factory.mktemp("data")
    s = Settings(database_url=database_url, amqp_url=amqp_url, data_dir=data_dir, amqp_delivery_limit=3)
    os.environ.update({"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "DATA_DIR": str(data_dir)})
    return s
