"""addenda the specialist signs on their own; a cancelled or closed case's reviews say so

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "addenda",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("review_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=30), nullable=False),
        sa.Column("text", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("signed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("report_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["review_id"], ["reviews.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("addenda", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_addenda_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_addenda_review_id"), ["review_id"], unique=False)
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("case_cancelled_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("case_closed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    # Cases cancelled or closed before these columns existed are not marked (the service recorded nothing for
    # a submitted review); from now on case.cancelled and the workflow's review.close mark every review.


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_column("case_closed_at")
        batch_op.drop_column("case_cancelled_at")
    op.drop_table("addenda")
