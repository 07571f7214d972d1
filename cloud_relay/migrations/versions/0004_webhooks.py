"""Webhook deliveries of alerts: pending ones (resumed after a restart) and dead letters.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("webhook", sa.String(2000), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("device", sa.String(63), nullable=False),
        sa.Column("alert_id", sa.String(32), nullable=False),
        sa.Column("alert", sa.JSON, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tries", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(300), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_webhook_deliveries_state_worker",
        "webhook_deliveries",
        ["state", "worker", "created"],
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_state_worker", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
