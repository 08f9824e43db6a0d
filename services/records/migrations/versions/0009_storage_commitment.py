"""DICOM Storage Commitment (Push Model): record_sources.storage_commitment, each report return's transaction
and commitment state, and record_commitment_requests (facilities asking us to commit what they sent)

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

UTCDateTime = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("record_sources") as batch_op:
        batch_op.add_column(
            sa.Column("storage_commitment", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("record_report_returns") as batch_op:
        batch_op.add_column(sa.Column("transaction_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commitment", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("committed_at", UTCDateTime(), nullable=True))
        batch_op.create_unique_constraint("uq_record_report_returns_transaction_uid", ["transaction_uid"])
    op.create_table(
        "record_commitment_requests",
        sa.Column("transaction_uid", sa.String(length=64), primary_key=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("partner_id", sa.String(length=100), nullable=False),
        sa.Column("references", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("committed", sa.Integer(), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_record_commitment_requests_status", "record_commitment_requests", ["status"])


def downgrade() -> None:
    op.drop_index("ix_record_commitment_requests_status", "record_commitment_requests")
    op.drop_table("record_commitment_requests")
    with op.batch_alter_table("record_report_returns") as batch_op:
        batch_op.drop_constraint("uq_record_report_returns_transaction_uid", type_="unique")
        for name in ("committed_at", "commitment", "transaction_uid"):
            batch_op.drop_column(name)
    with op.batch_alter_table("record_sources") as batch_op:
        batch_op.drop_column("storage_commitment")
