"""record type and date of each file, for the case's timeline

Revision ID: 0004
Revises: 0003
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
    with op.batch_alter_table("record_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("record_type", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
        batch_op.add_column(sa.Column("record_date", sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("record_files", schema=None) as batch_op:
        batch_op.drop_column("record_date")
        batch_op.drop_column("record_type")
