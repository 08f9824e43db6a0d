"""an index for the case list: a partner's cases in one status, newest first

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # GET /v1/cases?status=… reads one page of this index, however many cases there are.
    op.create_index("ix_cases_partner_status_created", "cases", ["partner_id", "status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_cases_partner_status_created", table_name="cases")
