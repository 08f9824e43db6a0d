"""seed the specialist directory

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

specialists = sa.table(
    "specialists",
    sa.column("id", sa.String),
    sa.column("display_name", sa.String),
    sa.column("credentials", sa.String),
    sa.column("npi", sa.String),
    sa.column("subspecialties", sa.JSON),
    sa.column("licensed_states", sa.JSON),
    sa.column("organization", sa.String),
    sa.column("academic", sa.Boolean),
    sa.column("max_open_reviews", sa.Integer),
    sa.column("active", sa.Boolean),
)


def _specialist(
    id: str,
    name: str,
    credentials: str,
    npi: str,
    subspecialties: list[str],
    states: list[str],
    organization: str,
    academic: bool,
    max_open_reviews: int,
) -> dict:
    return {
        "id": id,
        "display_name": name,
        "credentials": credentials,
        "npi": npi,
        "subspecialties": subspecialties,
        "licensed_states": states,
        "organization": organization,
        "academic": academic,
        "max_open_reviews": max_open_reviews,
        "active": True,
    }


# Fictional people; the NPIs carry a valid Luhn check digit but belong to no one.
SPECIALISTS = [
    _specialist(
        "spec-gyn-1", "Elena Marquez", "MD, FACR", "1234567810",
        ["gynecologic_imaging", "body_imaging"], ["CA", "NV", "AZ", "OR"],
        "Pacific University Medical Center", True, 5,
    ),
    _specialist(
        "spec-gyn-2", "Rachel Goldberg", "MD", "1987654328",
        ["gynecologic_imaging"], ["NY", "NJ", "CT", "MA"],
        "Hudson Women's Imaging", False, 6,
    ),
    _specialist(
        "spec-ob-1", "Amara Okafor", "MD, FACOG", "1456327893",
        ["maternal_fetal_medicine"], ["TX", "LA", "OK", "NM"],
        "Gulf Coast University Hospital", True, 4,
    ),
    _specialist(
        "spec-ob-2", "Sarah Lindqvist", "MD, FACOG", "1678432190",
        ["maternal_fetal_medicine"], ["MA", "NY", "RI", "NH", "CA"],
        "Bay State Perinatal Associates", False, 4,
    ),
    _specialist(
        "spec-breast-1", "Priya Raman", "MD, FSBI", "1325874695",
        ["breast_imaging"], ["CA", "WA", "OR"],
        "Cascadia Breast Center", False, 8,
    ),
    _specialist(
        "spec-body-1", "James Whitaker", "MD, FACR", "1762543985",
        ["body_imaging", "musculoskeletal"], ["TX", "CA", "NY", "FL"],
        "Lone Star Academic Radiology", True, 6,
    ),
    _specialist(
        "spec-vasc-1", "Kenji Watanabe", "MD, RPVI", "1543289767",
        ["vascular"], ["WA", "OR", "ID", "CA"],
        "Puget Sound Vascular Institute", True, 6,
    ),
    _specialist(
        "spec-neuro-1", "Laura Chen", "MD", "1892736459",
        ["neuroradiology_head_neck", "body_imaging"], ["MA", "NY", "CT", "NJ"],
        "Commonwealth University Hospital", True, 5,
    ),
    _specialist(
        "spec-peds-1", "Michael Brennan", "MD", "1135792467",
        ["pediatric", "musculoskeletal"], ["NY", "MA", "PA", "WA"],
        "Northeast Children's Hospital", True, 5,
    ),
]


def upgrade() -> None:
    op.bulk_insert(specialists, SPECIALISTS)


def downgrade() -> None:
    op.execute(specialists.delete().where(specialists.c.id.in_([s["id"] for s in SPECIALISTS])))
