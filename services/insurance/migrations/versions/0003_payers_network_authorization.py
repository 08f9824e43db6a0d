"""payers and their connectors, the network table, authorization rules, the estimate's parts

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The reviewing organizations of the review service's directory, and our own reading group.
READING_GROUP = "SecondOpinion Reading Group"
PAYERS = [
    ("ACME", "Acme Health", "plan_rules", None),
    ("BLUESTEM", "Bluestem Mutual", "plan_rules", None),
    ("MEDIVALUE", "MediValue", "plan_rules", None),
    # The payer sandbox (tests/payer_sandbox); tests and `make demo` point endpoint_url at its port.
    ("SBX01", "Sandbox Health", "x12", "http://127.0.0.1:8090/core/eligibility"),
]
PLAN_PAYERS = {
    "ACME-PPO": "ACME",
    "ACME-HMO": "ACME",
    "OLDPLAN": "ACME",
    "BLUE-HDHP": "BLUESTEM",
    "MEDIVALUE-BASIC": "MEDIVALUE",
}
NEW_PLANS = [
    # code, plan name, authorization rule; terms come from the payer's 271
    ("SBX-PPO", "Sandbox Gold PPO", "none"),
    ("SBX-EPO", "Sandbox Narrow EPO", "none"),
    ("ACME-GATED", "Acme Gatekeeper HMO", "referral"),
]
FEES = [
    ("76140", "SBX-PPO", "240.00"),
    ("76140", "SBX-EPO", "240.00"),
    ("76140", "ACME-GATED", "185.00"),
    # Re-interpretation of the study itself: its CPT with modifier 26 (professional component).
    ("76856-26", None, "180.00"),  # pelvic, complete
    ("76830-26", None, "175.00"),  # transvaginal
    ("76805-26", None, "210.00"),  # obstetric, after the first trimester
    ("76641-26", None, "160.00"),  # breast, complete
    ("76536-26", None, "150.00"),  # soft tissues of head and neck (thyroid)
    ("76856-26", "ACME-PPO", "98.50"),
    ("76830-26", "ACME-PPO", "92.10"),
    ("76805-26", "ACME-PPO", "121.30"),
]
NETWORK = [
    ("ACME-PPO", READING_GROUP, "in"),
    ("ACME-HMO", READING_GROUP, "in"),
    ("ACME-GATED", READING_GROUP, "in"),
    ("BLUE-HDHP", READING_GROUP, "in"),
    ("SBX-PPO", READING_GROUP, "in"),
    ("SBX-EPO", READING_GROUP, "out"),
    ("ACME-PPO", "Pacific University Medical Center", "in"),
    ("ACME-HMO", "Pacific University Medical Center", "in"),
    ("BLUE-HDHP", "Pacific University Medical Center", "in"),
    ("ACME-PPO", "Hudson Women's Imaging", "in"),
    ("ACME-HMO", "Hudson Women's Imaging", "out"),
    ("ACME-HMO", "Bay State Perinatal Associates", "in"),
    ("ACME-PPO", "Bay State Perinatal Associates", "out"),
]

VERIFICATION_COLUMNS = [
    sa.Column("member_id", sa.String(50), nullable=True),
    sa.Column("self_pay", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("patient_state", sa.String(2), nullable=False, server_default=""),
    sa.Column("outcome", sa.String(40), nullable=False, server_default=""),
    sa.Column("network", sa.String(10), nullable=False, server_default="unknown"),
    sa.Column("copay", sa.Numeric(10, 2), nullable=False, server_default="0"),
    sa.Column("deductible_applied", sa.Numeric(10, 2), nullable=False, server_default="0"),
    sa.Column("deductible_remaining", sa.Numeric(10, 2), nullable=True),
    sa.Column("coinsurance_pct", sa.Numeric(5, 4), nullable=False, server_default="0"),
    sa.Column("coinsurance_amount", sa.Numeric(10, 2), nullable=False, server_default="0"),
    sa.Column("authorization", sa.String(20), nullable=False, server_default="no-auth"),
    sa.Column("authorization_rule", sa.String(20), nullable=False, server_default="none"),
    sa.Column("authorization_number", sa.String(50), nullable=True),
    sa.Column("referral_document_id", sa.String(100), nullable=True),
    sa.Column("authorized_by", sa.String(100), nullable=True),
    sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
]


def upgrade() -> None:
    op.create_table(
        "insurance_payers",
        sa.Column("payer_id", sa.String(80), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("connector", sa.String(20), nullable=False),
        sa.Column("endpoint_url", sa.String(500), nullable=True),
        sa.Column("timeout_seconds", sa.Float(), nullable=False, server_default="10"),
        sa.CheckConstraint("connector IN ('plan_rules', 'x12')", name="ck_insurance_payers_connector"),
    )
    # Plain ADD COLUMN: a batch copy of insurance_plans would trip SQLite's foreign keys from insurance_fees.
    op.add_column("insurance_plans", sa.Column("payer_id", sa.String(80), nullable=True))
    op.add_column(
        "insurance_plans", sa.Column("authorization_rule", sa.String(20), nullable=False, server_default="none")
    )
    # SQLite cannot add constraints to an existing table; PostgreSQL (tests, production) gets them.
    if op.get_bind().dialect.name != "sqlite":
        op.create_foreign_key(
            "fk_insurance_plans_payer", "insurance_plans", "insurance_payers", ["payer_id"], ["payer_id"]
        )
        op.create_check_constraint(
            "ck_insurance_plans_authorization",
            "insurance_plans",
            "authorization_rule IN ('none', 'referral', 'prior_auth')",
        )
    op.create_table(
        "insurance_network",
        sa.Column("plan_code", sa.String(50), sa.ForeignKey("insurance_plans.code"), primary_key=True),
        sa.Column("organization", sa.String(200), primary_key=True),
        sa.Column("status", sa.String(3), nullable=False),
        sa.CheckConstraint("status IN ('in', 'out')", name="ck_insurance_network_status"),
    )
    with op.batch_alter_table("coverage_verifications") as batch:
        for column in VERIFICATION_COLUMNS:
            batch.add_column(column)

    payers = sa.table(
        "insurance_payers",
        *(sa.column(c, sa.String) for c in ("payer_id", "name", "connector", "endpoint_url")),
        sa.column("timeout_seconds", sa.Float),
    )
    op.bulk_insert(
        payers,
        [
            {"payer_id": p, "name": n, "connector": c, "endpoint_url": u, "timeout_seconds": 10.0}
            for p, n, c, u in PAYERS
        ],
    )
    plans = sa.table(
        "insurance_plans",
        *(sa.column(c, sa.String) for c in ("code", "payer_name", "plan_name", "payer_id", "authorization_rule")),
        sa.column("active", sa.Boolean),
        sa.column("covers_second_opinion", sa.Boolean),
        sa.column("copay", sa.Numeric(10, 2)),
        sa.column("coinsurance_pct", sa.Numeric(5, 4)),
        sa.column("deductible", sa.Numeric(10, 2)),
        sa.column("network", sa.String),
    )
    for code, payer in PLAN_PAYERS.items():
        op.execute(plans.update().where(plans.c.code == code).values(payer_id=payer))
    acme_hmo = {"copay": Decimal("40.00"), "coinsurance_pct": Decimal("0"), "deductible": Decimal("0.00")}
    op.bulk_insert(
        plans,
        [
            {
                "code": code,
                "payer_name": "Acme Health" if code.startswith("ACME") else "Sandbox Health",
                "plan_name": name,
                "payer_id": "ACME" if code.startswith("ACME") else "SBX01",
                "authorization_rule": rule,
                "active": True,
                "covers_second_opinion": True,
                "network": "in",
                **acme_hmo,
            }
            for code, name, rule in NEW_PLANS
        ],
    )
    fees = sa.table(
        "insurance_fees",
        sa.column("cpt", sa.String),
        sa.column("plan_code", sa.String),
        sa.column("allowed_amount", sa.Numeric(10, 2)),
    )
    op.bulk_insert(
        fees, [{"cpt": c, "plan_code": p, "allowed_amount": Decimal(a)} for c, p, a in FEES]
    )
    network = sa.table(
        "insurance_network", *(sa.column(c, sa.String) for c in ("plan_code", "organization", "status"))
    )
    op.bulk_insert(network, [{"plan_code": p, "organization": o, "status": s} for p, o, s in NETWORK])


def downgrade() -> None:
    op.execute("DELETE FROM insurance_fees WHERE plan_code IN ('SBX-PPO', 'SBX-EPO', 'ACME-GATED')")
    op.drop_table("insurance_network")
    with op.batch_alter_table("coverage_verifications") as batch:
        for column in VERIFICATION_COLUMNS:
            batch.drop_column(column.name)
    op.execute("DELETE FROM insurance_plans WHERE code IN ('SBX-PPO', 'SBX-EPO', 'ACME-GATED')")
    with op.batch_alter_table("insurance_plans") as batch:
        batch.drop_column("authorization_rule")
        batch.drop_column("payer_id")
    op.drop_table("insurance_payers")
