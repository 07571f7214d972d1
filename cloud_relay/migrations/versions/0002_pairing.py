"""Pairing: one-time tokens, and each device's current certificate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("certificate", sa.Text, nullable=True))
    op.create_table(
        "pairing_tokens",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("site", sa.String(200), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("pairing_tokens")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("certificate")
