"""an addendum remembers the Idempotency-Key it was signed with: a repeated POST signs nothing new

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


def upgrade() -> None:
    with op.batch_alter_table("addenda", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True)
        )
        batch_op.create_unique_constraint("uq_addenda_review_key", ["review_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("addenda", schema=None) as batch_op:
        batch_op.drop_constraint("uq_addenda_review_key", type_="unique")
        batch_op.drop_column("idempotency_key")
