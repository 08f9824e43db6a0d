"""SMART Backend Services: registered clients (JWKS, allowed scopes), access tokens (hashed), assertion ids

Revision ID: 0005
Revises: 0003 (re-point to the head on main when merging, e.g. 0004_atna_feed_shared_read_windows)
Create Date: 2026-12-07 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "smart_clients",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("partner_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("jwks", sa.Text(), nullable=False),
        sa.Column("jwks_uri", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.Column("jwks_fetched_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("scopes", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("label", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["partner_id"], ["partners.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_smart_clients_partner_id", "smart_clients", ["partner_id"])
    op.create_table(
        "smart_access_tokens",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("client_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("scope", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["client_id"], ["smart_clients.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_smart_access_tokens_client_id", "smart_access_tokens", ["client_id"])
    op.create_index("ix_smart_access_tokens_expires_at", "smart_access_tokens", ["expires_at"])
    op.create_table(
        "smart_assertion_ids",
        sa.Column("client_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("jti", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti"),
    )
    op.create_index("ix_smart_assertion_ids_expires_at", "smart_assertion_ids", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_smart_assertion_ids_expires_at", table_name="smart_assertion_ids")
    op.drop_table("smart_assertion_ids")
    op.drop_index("ix_smart_access_tokens_expires_at", table_name="smart_access_tokens")
    op.drop_index("ix_smart_access_tokens_client_id", table_name="smart_access_tokens")
    op.drop_table("smart_access_tokens")
    op.drop_index("ix_smart_clients_partner_id", table_name="smart_clients")
    op.drop_table("smart_clients")
