"""record sources per partner and retrievals from their PACS

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoString = sqlmodel.sql.sqltypes.AutoString
UTCDateTime = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "record_sources",
        sa.Column("partner_id", AutoString(length=100), nullable=False),
        sa.Column("ae_title", AutoString(length=16), nullable=True),
        sa.Column("host", AutoString(length=253), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("retrieve_method", AutoString(length=8), nullable=False),
        sa.Column("dicomweb_url", AutoString(length=500), nullable=True),
        sa.Column("dicomweb_auth_env", AutoString(length=100), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("partner_id"),
    )
    op.create_table(
        "record_retrievals",
        sa.Column("retrieval_id", AutoString(length=64), nullable=False),
        sa.Column("case_id", AutoString(length=64), nullable=False),
        sa.Column("partner_id", AutoString(length=100), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", AutoString(length=300), nullable=True),
        sa.Column("study_instance_uid", AutoString(length=64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["record_requests.case_id"]),
        sa.PrimaryKeyConstraint("retrieval_id"),
    )
    with op.batch_alter_table("record_retrievals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_record_retrievals_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_record_retrievals_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("record_retrievals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_record_retrievals_status"))
        batch_op.drop_index(batch_op.f("ix_record_retrievals_case_id"))
    op.drop_table("record_retrievals")
    op.drop_table("record_sources")
