"""lexicon assessments, critical results and their communication; RADPEER 4 retired (2016)

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assessments", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("critical_result", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("communication", sa.JSON(), nullable=True))
    # RADPEER 2016: score 4 was folded into 3 (a/b kept).
    op.execute("UPDATE reviews SET radpeer_score = '3a' WHERE radpeer_score = '4a'")
    op.execute("UPDATE reviews SET radpeer_score = '3b' WHERE radpeer_score = '4b'")


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        for column in ("communication", "critical_result", "assessments"):
            batch_op.drop_column(column)
