"""reports keep their case's partner and order, for the FHIR search of DiagnosticReport

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REPORTS = sa.table(
    "reports",
    sa.column("id", sa.String),
    sa.column("review_id", sa.String),
    sa.column("partner_id", sa.String),
    sa.column("order_value", sa.String),
    sa.column("order_system", sa.String),
)
REVIEWS = sa.table("reviews", sa.column("id", sa.String), sa.column("request", sa.JSON))


def upgrade() -> None:
    op.add_column("reports", sa.Column("partner_id", sa.String(64), nullable=True))
    op.add_column("reports", sa.Column("order_value", sa.String(100), nullable=True))
    op.add_column("reports", sa.Column("order_system", sa.String(255), nullable=True))
    # GET /fhir/DiagnosticReport pages a partner's reports newest first, or finds the one of an order.
    op.create_index("ix_reports_partner_created", "reports", ["partner_id", "created_at", "id"])
    op.create_index("ix_reports_partner_order", "reports", ["partner_id", "order_value"])
    # Reports composed before: partner and order from the match their review was made by (Review.request).
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(REPORTS.c.id, REVIEWS.c.request).join(REVIEWS, REVIEWS.c.id == REPORTS.c.review_id)
    ).all()
    for report_id, request in rows:
        request = request or {}
        value = request.get("partner_case_ref")
        bind.execute(
            REPORTS.update()
            .where(REPORTS.c.id == report_id)
            .values(
                partner_id=request.get("partner_id"),
                order_value=value,
                order_system=(request.get("partner_case_ref_system") or "") if value else None,
            )
        )


def downgrade() -> None:
    op.drop_index("ix_reports_partner_order", table_name="reports")
    op.drop_index("ix_reports_partner_created", table_name="reports")
    with op.batch_alter_table("reports") as batch_op:
        batch_op.drop_column("order_system")
        batch_op.drop_column("order_value")
        batch_op.drop_column("partner_id")
