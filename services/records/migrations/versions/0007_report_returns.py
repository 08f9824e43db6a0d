"""the second-opinion report sent back into the facility's PACS: record_sources.return_reports and the
record_report_returns queue

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTCDateTime = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("record_sources") as batch_op:
        batch_op.add_column(sa.Column("return_reports", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "record_report_returns",
        sa.Column("return_id", sa.String(length=64), primary_key=True),
        sa.Column("case_id", sa.String(length=64), nullable=False),
        sa.Column("partner_id", sa.String(length=100), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("sent_sop_instance_uid", sa.String(length=64), nullable=True),
    )
    op.create_index("ix_record_report_returns_case_id", "record_report_returns", ["case_id"])
    op.create_index("ix_record_report_returns_status", "record_report_returns", ["status"])


def downgrade() -> None:
    op.drop_index("ix_record_report_returns_status", "record_report_returns")
    op.drop_index("ix_record_report_returns_case_id", "record_report_returns")
    op.drop_table("record_report_returns")
    with op.batch_alter_table("record_sources") as batch_op:
        batch_op.drop_column("return_reports")
