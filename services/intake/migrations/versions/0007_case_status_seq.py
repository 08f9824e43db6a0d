"""the case's mirrored status keeps the number of the workflow's status change it came from

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL until the first numbered status change: the ones before were ordered by time, and still are. Plain
    # ALTER TABLE (SQLite has both since 3.35), not a batch: see downgrade.
    op.add_column("cases", sa.Column("status_seq", sa.Integer(), nullable=True))


def downgrade() -> None:
    # On SQLite a DDL statement is not undone when a later step of the same downgrade refuses (0006 does while two
    # orders share a reference), though the revision is: the second try finds the column gone.
    if "status_seq" in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("cases")}:
        op.drop_column("cases", "status_seq")
