"""seed plans, fees and member accumulators (invented but realistic numbers)

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

plans = sa.table(
    "insurance_plans",
    sa.column("code", sa.String),
    sa.column("payer_name", sa.String),
    sa.column("plan_name", sa.String),
    sa.column("active", sa.Boolean),
    sa.column("covers_second_opinion", sa.Boolean),
    sa.column("copay", sa.Numeric(10, 2)),
    sa.column("coinsurance_pct", sa.Numeric(5, 4)),
    sa.column("deductible", sa.Numeric(10, 2)),
    sa.column("network", sa.String),
)
fees = sa.table(
    "insurance_fees",
    sa.column("cpt", sa.String),
    sa.column("plan_code", sa.String),
    sa.column("allowed_amount", sa.Numeric(10, 2)),
)
accumulators = sa.table(
    "insurance_member_accumulators",
    sa.column("plan_code", sa.String),
    sa.column("member_id", sa.String),
    sa.column("deductible_met", sa.Numeric(10, 2)),
)

PLANS = [
    ("ACME-PPO", "Acme Health", "Acme Choice PPO", True, True, "25.00", "0.20", "500.00", "in"),
    ("ACME-HMO", "Acme Health", "Acme Select HMO", True, True, "40.00", "0", "0.00", "in"),
    ("BLUE-HDHP", "Bluestem Mutual", "Bluestem HSA Saver HDHP", True, True, "0.00", "0.10", "3000.00", "in"),
    ("MEDIVALUE-BASIC", "MediValue", "MediValue Basic", True, False, "15.00", "0.30", "1500.00", "out"),
    ("OLDPLAN", "Acme Health", "Acme Classic Indemnity (retired)", False, True, "30.00", "0.20", "1000.00", "in"),
]
FEES = [
    ("76140", None, "350.00"),  # self-pay price
    ("76140", "ACME-PPO", "212.40"),
    ("76140", "ACME-HMO", "185.00"),
    ("76140", "BLUE-HDHP", "238.75"),
    ("76140", "OLDPLAN", "226.00"),
]
ACCUMULATORS = [
    ("ACME-PPO", "ACM100200300", "500.00"),  # deductible met
    ("ACME-PPO", "ACM100200301", "420.00"),  # $80.00 of the deductible left
    ("BLUE-HDHP", "BLU7780042", "3000.00"),  # deductible met
]


def upgrade() -> None:
    keys = ("code", "payer_name", "plan_name", "active", "covers_second_opinion")
    op.bulk_insert(
        plans,
        [
            {
                **dict(zip(keys, row[:5], strict=True)),
                "copay": Decimal(row[5]),
                "coinsurance_pct": Decimal(row[6]),
                "deductible": Decimal(row[7]),
                "network": row[8],
            }
            for row in PLANS
        ],
    )
    op.bulk_insert(
        fees, [{"cpt": cpt, "plan_code": plan, "allowed_amount": Decimal(amount)} for cpt, plan, amount in FEES]
    )
    op.bulk_insert(
        accumulators,
        [{"plan_code": p, "member_id": m, "deductible_met": Decimal(met)} for p, m, met in ACCUMULATORS],
    )


def downgrade() -> None:
    op.execute(accumulators.delete())
    op.execute(fees.delete())
    op.execute(plans.delete())
