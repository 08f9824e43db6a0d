"""when the current attempt of a retrieval began (the retrieval's own duration is finished_at - started_at)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTCDateTime = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("record_retrievals") as batch_op:
        batch_op.add_column(sa.Column("started_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("record_retrievals") as batch_op:
        batch_op.drop_column("started_at")
