"""a partner's order reference keeps its identifier system: unique per (partner, value, system)

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
    # "" is "no system" (a NULL would never collide in the unique constraint). Value before system, so a
    # search of a value under any system uses it too.
    with op.batch_alter_table("cases") as batch_op:
        batch_op.add_column(
            sa.Column("partner_case_ref_system", sa.String(length=255), nullable=False, server_default="")
        )
        batch_op.drop_constraint("uq_cases_partner_ref", type_="unique")
        batch_op.create_unique_constraint(
            "uq_cases_partner_ref_system", ["partner_id", "partner_case_ref", "partner_case_ref_system"]
        )
    # References stored before were kept without the system they came with, if any: "*" (not a URI, so no
    # order's) says so, and such a reference answers its value under any system (an order sent again after
    # the upgrade finds its case instead of opening a second one).
    op.execute("UPDATE cases SET partner_case_ref_system = '*' WHERE partner_case_ref IS NOT NULL")


def downgrade() -> None:
    shared = op.get_bind().execute(
        sa.text(
            "SELECT count(*) FROM (SELECT partner_id, partner_case_ref FROM cases "
            "WHERE partner_case_ref IS NOT NULL GROUP BY partner_id, partner_case_ref "
            "HAVING count(*) > 1) AS shared"
        )
    ).scalar_one()
    if shared:
        raise RuntimeError(
            f"{shared} partner reference(s) name more than one case (one per identifier system); without "
            "the system they cannot be unique again. Nothing was changed: give those cases distinct "
            "partner_case_ref values first, then downgrade."
        )
    with op.batch_alter_table("cases") as batch_op:
        batch_op.drop_constraint("uq_cases_partner_ref_system", type_="unique")
        batch_op.create_unique_constraint("uq_cases_partner_ref", ["partner_id", "partner_case_ref"])
        batch_op.drop_column("partner_case_ref_system")
