"""FHIR Subscription update: a subscription's version (meta.versionId, the ETag), when it last changed, and the
source event id of its current handshake (an update that changes the endpoint queues a new one)

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Subscriptions created before are version 1, never updated, with the handshake queued when created.
    with op.batch_alter_table("fhir_subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version_id", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "handshake_event",
                sqlmodel.sql.sqltypes.AutoString(length=40),
                nullable=False,
                server_default="handshake",
            )
        )


def downgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("fhir_subscriptions"):
        return
    columns = {c["name"] for c in inspector.get_columns("fhir_subscriptions")}
    for column in ("handshake_event", "updated_at", "version_id"):
        if column in columns:  # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later too): no copy of the table
            op.drop_column("fhir_subscriptions", column)
