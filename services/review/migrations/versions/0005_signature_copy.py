"""the reviewer's signature block copied onto the review at submission

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Reviews submitted before stay without a copy: their report keeps printing the directory's entry.
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("signed_name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("signed_credentials", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(sa.Column("signed_npi", sqlmodel.sql.sqltypes.AutoString(length=10), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        for column in ("signed_npi", "signed_credentials", "signed_name"):
            batch_op.drop_column(column)
