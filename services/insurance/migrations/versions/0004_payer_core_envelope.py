"""the CAQH CORE envelope standard each payer speaks: mime (HTTP MIME multipart) or soap (SOAP 1.2 + WSDL)

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every payer so far was asked in the MIME multipart form: that stays the default.
    op.add_column(
        "insurance_payers",
        sa.Column("core_envelope", sa.String(10), nullable=False, server_default="mime"),
    )
    # SQLite cannot add constraints to an existing table; PostgreSQL (tests, production) gets it.
    if op.get_bind().dialect.name != "sqlite":
        op.create_check_constraint(
            "ck_insurance_payers_core_envelope", "insurance_payers", "core_envelope IN ('mime', 'soap')"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("ck_insurance_payers_core_envelope", "insurance_payers", type_="check")
    with op.batch_alter_table("insurance_payers") as batch:
        batch.drop_column("core_envelope")
