"""Initial schema: devices, presence_events, calls, commands.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("site", sa.String(200), nullable=True),
        sa.Column("group", sa.String(200), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("presence", sa.String(32), nullable=True),
        sa.Column("board", sa.String(100), nullable=True),
        sa.Column("version", sa.String(100), nullable=True),
    )
    op.create_table(
        "presence_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device", sa.String(63), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_presence_events_device_at", "presence_events", ["device", "at"])
    op.create_table(
        "calls",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("caller", sa.String(63), nullable=False),
        sa.Column("callee", sa.String(63), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("quality", sa.JSON, nullable=True),
    )
    op.create_index("ix_calls_started", "calls", ["started"])
    op.create_table(
        "commands",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device", sa.String(63), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("sent", sa.DateTime(timezone=True), nullable=False),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_index("ix_commands_device_sent", "commands", ["device", "sent"])


def downgrade() -> None:
    op.drop_index("ix_commands_device_sent", "commands")
    op.drop_table("commands")
    op.drop_index("ix_calls_started", "calls")
    op.drop_table("calls")
    op.drop_index("ix_presence_events_device_at", "presence_events")
    op.drop_table("presence_events")
    op.drop_table("devices")
