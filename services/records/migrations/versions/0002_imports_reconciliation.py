"""imports, reconciliation, cancellation, reminders, adequacy

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "record_imports",
        sa.Column("import_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("differences", sa.JSON(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("decided_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("decided_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["record_requests.case_id"]),
        sa.PrimaryKeyConstraint("import_id"),
    )
    with op.batch_alter_table("record_imports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_record_imports_case_id"), ["case_id"], unique=False)
    with op.batch_alter_table("record_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partner_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True))
        batch_op.add_column(sa.Column("cancelled_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("reminders_sent", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("last_reminded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("adequacy", sa.JSON(), nullable=True))
    with op.batch_alter_table("record_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("import_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column("released", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("sop_class_uid", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column("study_date", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True))
        batch_op.add_column(sa.Column("has_regions", sa.Boolean(), nullable=True))
        batch_op.add_column(
            sa.Column("burned_in_annotation", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True)
        )
        batch_op.create_foreign_key(
            "fk_record_files_import_id", "record_imports", ["import_id"], ["import_id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("record_files", schema=None) as batch_op:
        batch_op.drop_constraint("fk_record_files_import_id", type_="foreignkey")
        for column in (
            "burned_in_annotation",
            "has_regions",
            "study_date",
            "sop_class_uid",
            "released",
            "import_id",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("record_requests", schema=None) as batch_op:
        for column in ("adequacy", "last_reminded_at", "reminders_sent", "cancelled_at", "partner_id"):
            batch_op.drop_column(column)
    with op.batch_alter_table("record_imports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_record_imports_case_id"))
    op.drop_table("record_imports")
