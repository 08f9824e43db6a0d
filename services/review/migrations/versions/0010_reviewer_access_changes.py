"""changes of a specialist's access to a case, noted until the auth registry is settled; past declines and
withdrawals noted too, so access they left behind is revoked

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    changes = op.create_table(
        "reviewer_access_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("specialist_id", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
        sa.Column("noted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Until now a specialist kept read access to every case ever offered to them. Each one who declined or was
    # withdrawn from a case is settled once by the review process: revoked, unless they hold the case again.
    left = op.get_bind().execute(
        sa.text("SELECT DISTINCT case_id, reviewer_id FROM reviews WHERE status IN ('declined', 'withdrawn')")
    )
    now = datetime.now(UTC)
    rows = [
        {"case_id": case_id, "specialist_id": reviewer_id, "noted_at": now} for case_id, reviewer_id in left
    ]
    if rows:
        op.bulk_insert(changes, rows)


def downgrade() -> None:
    op.drop_table("reviewer_access_changes")
