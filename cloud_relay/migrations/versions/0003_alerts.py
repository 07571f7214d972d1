"""Alerts from the boards, one row per alert id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device", sa.String(63), nullable=False),
        sa.Column("detector", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("level", sa.Float, nullable=False),
        sa.Column("received", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index("ix_alerts_received", "alerts", ["received"])
    op.create_index("ix_alerts_device_received", "alerts", ["device", "received"])


def downgrade() -> None:
    op.drop_index("ix_alerts_device_received", table_name="alerts")
    op.drop_index("ix_alerts_received", table_name="alerts")
    op.drop_table("alerts")
