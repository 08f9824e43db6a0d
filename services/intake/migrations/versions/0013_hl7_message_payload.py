"""An HL7 message is built once, at its first attempt: its bytes are kept, and every retry and replay sends them

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite has both since 3.35), not a batch: see downgrade.
    op.add_column("hl7_messages", sa.Column("payload", sa.Text(), nullable=True))


def downgrade() -> None:
    # On SQLite a DDL statement is not undone when a later step of the same downgrade refuses (0006 does while two
    # orders share a reference), though the revision is: the second try finds the column gone.
    if "payload" in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("hl7_messages")}:
        op.drop_column("hl7_messages", "payload")
