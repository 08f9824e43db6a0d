"""specialist keys, case owners and reviewers, hash-chained audit log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Row triggers do not fire on TRUNCATE: refuse that too, so the log cannot be emptied by the app.
NO_TRUNCATE = """
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
"""


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("specialist_id", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=True))
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_table(
        "case_owners",
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("partner_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("registered_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("case_id"),
    )
    op.create_index("ix_case_owners_partner_id", "case_owners", ["partner_id"])
    op.create_table(
        "case_reviewers",
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("specialist_id", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
        sa.Column("registered_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("case_id", "specialist_id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NO_TRUNCATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
    op.drop_table("case_reviewers")
    op.drop_index("ix_case_owners_partner_id", table_name="case_owners")
    op.drop_table("case_owners")
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.drop_column("row_hash")
        batch_op.drop_column("prev_hash")
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("specialist_id")
