"""HL7 v2 over MLLP: a partner's interface engine endpoints, the ORU^R01 outbox and its attempts

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

String = sqlmodel.sql.sqltypes.AutoString
Moment = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "hl7_endpoints",
        sa.Column("id", String(length=36), nullable=False),
        sa.Column("partner_id", String(length=64), nullable=False),
        sa.Column("host", String(length=253), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("receiving_application", String(length=180), nullable=False),
        sa.Column("receiving_facility", String(length=180), nullable=False),
        sa.Column("assigning_authority", String(length=180), nullable=False),
        sa.Column("description", String(length=200), nullable=False),
        sa.Column("disabled_at", Moment(), nullable=True),
        sa.Column("disabled_reason", String(length=200), nullable=False),
        sa.Column("created_at", Moment(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("hl7_endpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_endpoints_partner_id"), ["partner_id"], unique=False)

    op.create_table(
        "hl7_messages",
        sa.Column("id", String(length=20), nullable=False),
        sa.Column("endpoint_id", String(length=36), nullable=False),
        sa.Column("source_event_id", String(length=300), nullable=False),
        sa.Column("case_id", String(length=36), nullable=False),
        sa.Column("report_id", String(length=64), nullable=False),
        sa.Column("result_status", String(length=1), nullable=False),
        sa.Column("pdf_url", String(length=2000), nullable=False),
        sa.Column("fhir_url", String(length=2000), nullable=False),
        sa.Column("status", String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Moment(), nullable=False),
        sa.Column("last_ack_code", String(length=2), nullable=True),
        sa.Column("last_error", String(length=300), nullable=False),
        sa.Column("delivered_at", Moment(), nullable=True),
        sa.Column("created_at", Moment(), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["hl7_endpoints.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("endpoint_id", "source_event_id", name="uq_hl7_message_per_event"),
    )
    with op.batch_alter_table("hl7_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_messages_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_hl7_messages_endpoint_id"), ["endpoint_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_hl7_messages_next_attempt_at"), ["next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_hl7_messages_status"), ["status"], unique=False)
        batch_op.create_index("ix_hl7_messages_endpoint_created", ["endpoint_id", "created_at"], unique=False)

    op.create_table(
        "hl7_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", String(length=20), nullable=False),
        sa.Column("at", Moment(), nullable=False),
        sa.Column("ack_code", String(length=2), nullable=True),
        sa.Column("error", String(length=300), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["hl7_messages.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("hl7_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_attempts_message_id"), ["message_id"], unique=False)


def downgrade() -> None:
    # A downgrade that an earlier migration's refuses (SQLite keeps no DDL transaction) may run this twice.
    inspector = sa.inspect(op.get_bind())
    for table in ("hl7_attempts", "hl7_messages", "hl7_endpoints"):
        if inspector.has_table(table):
            op.drop_table(table)
