"""HL7 v2 orders in over MLLP: a partner's registered senders (each message's ACK is kept with the API's
idempotency keys)

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

String = sqlmodel.sql.sqltypes.AutoString
Moment = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "hl7_senders",
        sa.Column("id", String(length=36), nullable=False),
        sa.Column("partner_id", String(length=64), nullable=False),
        sa.Column("sending_application", String(length=180), nullable=False),
        sa.Column("sending_facility", String(length=180), nullable=False),
        sa.Column("certificate_sha256", String(length=64), nullable=False),
        sa.Column("default_reason", String(length=40), nullable=False),
        sa.Column("exam_codes", sa.Text(), server_default="{}", nullable=False),
        sa.Column("description", String(length=200), nullable=False),
        sa.Column("disabled_at", Moment(), nullable=True),
        sa.Column("disabled_reason", String(length=200), nullable=False),
        sa.Column("created_at", Moment(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("hl7_senders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_senders_partner_id"), ["partner_id"], unique=False)
        batch_op.create_index(
            "ix_hl7_senders_identity",
            ["sending_application", "sending_facility", "certificate_sha256"],
            unique=False,
        )


def downgrade() -> None:
    # A downgrade that an earlier migration's refuses (SQLite keeps no DDL transaction) may run this twice.
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table("hl7_senders"):
        op.drop_table("hl7_senders")
