"""FHIR Subscriptions (R5 Backport on R4): a subscription's channel is a webhook endpoint of kind
`fhir-subscription`, with the headers its notifications carry

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "kind", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False, server_default="webhook"
            )
        )
        batch_op.add_column(sa.Column("channel_headers", sa.Text(), nullable=False, server_default="[]"))
    op.create_table(
        "fhir_subscriptions",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("partner_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("topic", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("task_statuses", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("payload_content", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("heartbeat_seconds", sa.Integer(), nullable=True),
        sa.Column("events_since_start", sa.Integer(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("resource_json", sa.Text(), nullable=False),
        sa.Column("last_queued_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["webhook_endpoints.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fhir_subscriptions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fhir_subscriptions_partner_id"), ["partner_id"], unique=False)
    # The sender's order of a subscription's deliveries (and the claim's look for an earlier one pending).
    op.create_index(
        "ix_webhook_deliveries_endpoint_created", "webhook_deliveries", ["endpoint_id", "created_at"]
    )


def downgrade() -> None:
    # Each step only if still there: on SQLite a downgrade that a later step refuses (0006) has run this one
    # already, and runs it again on the next try.
    inspector = sa.inspect(op.get_bind())
    op.drop_index("ix_webhook_deliveries_endpoint_created", table_name="webhook_deliveries", if_exists=True)
    if inspector.has_table("fhir_subscriptions"):
        op.drop_index("ix_fhir_subscriptions_partner_id", table_name="fhir_subscriptions", if_exists=True)
        op.drop_table("fhir_subscriptions")
    columns = {c["name"] for c in inspector.get_columns("webhook_endpoints")}
    for column in ("channel_headers", "kind"):
        if column in columns:  # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later too): no copy of the table
            op.drop_column("webhook_endpoints", column)
