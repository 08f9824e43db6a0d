"""indexes for FHIR search: a partner's cases newest first, and by their last change

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # GET /fhir/Task and /fhir/ServiceRequest page a partner's cases newest first, by (created_at, id), whatever
    # their status: one page of this index, and its count, however many cases the partner has.
    op.create_index("ix_cases_partner_created", "cases", ["partner_id", "created_at", "id"])
    # Task?_lastUpdated=… (a partner polling what changed since its last look).
    op.create_index("ix_cases_partner_updated", "cases", ["partner_id", "updated_at"])


def downgrade() -> None:
    # if_exists: on SQLite a downgrade that a later step refuses (0006) has dropped them already.
    op.drop_index("ix_cases_partner_updated", table_name="cases", if_exists=True)
    op.drop_index("ix_cases_partner_created", table_name="cases", if_exists=True)
