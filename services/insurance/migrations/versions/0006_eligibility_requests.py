"""the CoverageEligibilityRequest a kept CoverageEligibilityResponse answers is kept with it (its `request` named
a request nobody could read)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Answers given before keep no request (NULL): reading theirs is a 404 saying so.
    with op.batch_alter_table("eligibility_responses") as batch_op:
        batch_op.add_column(sa.Column("request", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("eligibility_responses") as batch_op:
        batch_op.drop_column("request")
