"""DICOM over TLS to a partner's PACS: record_sources.tls and its CA bundle, client certificate, key and
server name (paths on the records host)

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PATHS = ("tls_ca_path", "tls_cert_path", "tls_key_path")


def upgrade() -> None:
    with op.batch_alter_table("record_sources") as batch_op:
        batch_op.add_column(sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false()))
        for name in PATHS:
            batch_op.add_column(sa.Column(name, sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("tls_server_name", sa.String(length=253), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("record_sources") as batch_op:
        for name in ("tls_server_name", *reversed(PATHS), "tls"):
            batch_op.drop_column(name)
