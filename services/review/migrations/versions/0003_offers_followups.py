"""offers, drafts, follow-up questions, report versions, directory networks and out-of-office

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 04:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NETWORKS = {
    "spec-gyn-1": ["ACME-PPO", "ACME-HMO", "BLUE-HDHP"],
    "spec-gyn-2": ["ACME-PPO"],
    "spec-ob-1": ["ACME-PPO", "BLUE-HDHP"],
    "spec-ob-2": ["ACME-HMO"],
    "spec-breast-1": ["ACME-PPO", "ACME-HMO"],
    "spec-body-1": ["BLUE-HDHP"],
    "spec-vasc-1": ["ACME-PPO"],
    "spec-neuro-1": ["ACME-PPO", "BLUE-HDHP"],
    "spec-peds-1": ["ACME-HMO"],
}


def upgrade() -> None:
    with op.batch_alter_table("specialists", schema=None) as batch_op:
        batch_op.add_column(sa.Column("payer_networks", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("out_of_office", sa.JSON(), nullable=True))
    specialists = sa.table(
        "specialists", sa.column("id", sa.String), sa.column("payer_networks", sa.JSON),
        sa.column("out_of_office", sa.JSON),
    )
    op.execute(specialists.update().values(payer_networks=[], out_of_office=[]))
    for specialist_id, plans in NETWORKS.items():
        op.execute(specialists.update().where(specialists.c.id == specialist_id).values(payer_networks=plans))
    with op.batch_alter_table("specialists", schema=None) as batch_op:
        batch_op.alter_column("payer_networks", nullable=False)
        batch_op.alter_column("out_of_office", nullable=False)

    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accepted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("declined_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("decline_reason", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True))
        batch_op.add_column(sa.Column("withdrawn_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("withdrawn_reason", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True))
        batch_op.add_column(sa.Column("draft", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("radpeer_score", sqlmodel.sql.sqltypes.AutoString(length=2), nullable=True))
        batch_op.add_column(sa.Column("patient_answers", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    reviews = sa.table(
        "reviews", sa.column("status", sa.String), sa.column("assigned_at", sa.DateTime),
        sa.column("accepted_at", sa.DateTime),
    )
    # Before offers existed a match assigned the review outright: those count as accepted.
    op.execute(
        reviews.update().where(reviews.c.status == "assigned").values(status="accepted", accepted_at=reviews.c.assigned_at)
    )

    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))

    op.create_table(
        "follow_up_questions",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("case_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("review_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("text", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("asked_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("asked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("answer", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("answered_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["review_id"], ["reviews.id"]),
        sa.PrimaryKeyConstraint("id", "case_id"),
    )
    with op.batch_alter_table("follow_up_questions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_follow_up_questions_review_id"), ["review_id"], unique=False)


def downgrade() -> None:
    op.drop_table("follow_up_questions")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("updated_at")
        batch_op.drop_column("version")
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        for column in ("patient_answers", "radpeer_score", "draft", "withdrawn_reason", "withdrawn_at",
                       "decline_reason", "declined_at", "accepted_at"):
            batch_op.drop_column(column)
    with op.batch_alter_table("specialists", schema=None) as batch_op:
        batch_op.drop_column("out_of_office")
        batch_op.drop_column("payer_networks")
