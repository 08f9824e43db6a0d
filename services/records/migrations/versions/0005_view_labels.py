"""what each instance says it shows, for the exam-type view checklist

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("record_files") as batch_op:
        batch_op.add_column(sa.Column("view_label", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("record_files") as batch_op:
        batch_op.drop_column("view_label")
