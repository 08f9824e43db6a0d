"""Alembic per service: `upgrade(service)` brings its schema to head.

Each service keeps `services/<service>/migrations/` with an `env.py` that calls `run_env`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from services.common.db import get_engine

COMMON_TABLES = ("inbox", "outbox")


def alembic_config(service: str, engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[1] / service / "migrations"))
    cfg.attributes["service"] = service
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(service: str, engine: Engine | None = None) -> None:
    """Apply every migration of `service`; safe to call at every start."""
    command.upgrade(alembic_config(service, engine or get_engine(service)), "head")


def run_env(service: str, tables: tuple[str, ...]) -> None:
    """The body of a service's migrations/env.py: online migrations on the service's engine."""
    wanted = set(tables) | set(COMMON_TABLES)

    def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
        if type_ == "table":
            return name in wanted
        table = getattr(obj, "table", None)
        return table is None or table.name in wanted

    engine = context.config.attributes.get("engine") or get_engine(service)
    metadata: MetaData = SQLModel.metadata
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch migrations recreate tables; with foreign keys on, dropping a referenced table fails.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=metadata,
            include_object=include_object,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


def new_revision(service: str, message: str, rev_id: str) -> None:
    """Autogenerate a migration for `service` against a scratch SQLite database (developer tool).

    python -c "from services.common.migrate import new_revision; new_revision('records', 'initial', '0001')"
    """
    import shutil
    import tempfile

    from services.common.config import Settings
    from services.common.db import make_engine

    versions = Path(__file__).resolve().parents[1] / service / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).resolve().parent / "alembic" / "script.py.mako"
    shutil.copy(template, versions.parent / "script.py.mako")
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(service, Settings(data_dir=Path(tmp), database_url=None))
        cfg = alembic_config(service, engine)
        command.upgrade(cfg, "head")
        command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)
