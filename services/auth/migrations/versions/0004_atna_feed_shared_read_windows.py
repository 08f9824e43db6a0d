"""the caller's network address on audit entries, a case's patient id beside its owner, the ATNA feed's cursor,
read windows shared by replicas

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.add_column(
            sa.Column("network_address", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
    with op.batch_alter_table("case_owners") as batch_op:
        batch_op.add_column(sa.Column("patient_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_table(
        "audit_read_windows",
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("instance_uid", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "case_id", "instance_uid", "window_start"),
    )
    op.create_index("ix_audit_read_windows_window_start", "audit_read_windows", ["window_start"])
    op.create_table(
        "audit_forward_cursors",
        sa.Column("feed", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("forwarded_through", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("feed"),
    )


def downgrade() -> None:
    op.drop_table("audit_forward_cursors")
    op.drop_index("ix_audit_read_windows_window_start", table_name="audit_read_windows")
    op.drop_table("audit_read_windows")
    with op.batch_alter_table("case_owners") as batch_op:
        batch_op.drop_column("patient_id")
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.drop_column("network_address")
