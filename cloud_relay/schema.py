"""The relay's tables (SQLAlchemy Core). Migrations in ``migrations/`` create exactly these.

Times are timezone-aware UTC ``DateTime`` columns; SQLite hands them back naive,
and ``store`` reads them back as UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

devices = Table(
    "devices",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("name", String(200), nullable=True),
    Column("site", String(200), nullable=True),
    Column("group", String(200), nullable=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=True),
    Column("presence", String(32), nullable=True),
    Column("board", String(100), nullable=True),
    Column("version", String(100), nullable=True),
    # PEM of the certificate issued at its latest pairing: checks its signatures.
    Column("certificate", Text, nullable=True),
)

presence_events = Table(
    "presence_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device", String(63), ForeignKey("devices.id"), nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_presence_events_device_at", "device", "at"),
)

calls = Table(
    "calls",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("caller", String(63), nullable=False),
    Column("callee", String(63), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("started", DateTime(timezone=True), nullable=False),
    Column("answered", DateTime(timezone=True), nullable=True),
    Column("ended", DateTime(timezone=True), nullable=True),
    Column("end_reason", String(64), nullable=True),
    Column("quality", JSON, nullable=True),
    Index("ix_calls_started", "started"),
)

commands = Table(
    "commands",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device", String(63), nullable=False),
    Column("name", String(64), nullable=False),
    Column("args", JSON, nullable=False),
    Column("sent", DateTime(timezone=True), nullable=False),
    Column("result", JSON, nullable=True),
    Column("status", String(16), nullable=False),
    Index("ix_commands_device_sent", "device", "sent"),
)

pairing_tokens = Table(
    "pairing_tokens",
    metadata,
    # SHA-256 of the token's secret: the store never holds a usable token.
    Column("digest", String(64), primary_key=True),
    Column("device", String(63), nullable=False),
    Column("name", String(200), nullable=True),
    Column("site", String(200), nullable=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("used", DateTime(timezone=True), nullable=True),
    Column("used_by", String(64), nullable=True),
)

alerts = Table(
    "alerts",
    metadata,
    # Chosen on the board (128 random bits, hex) and kept on resends: the dedup key.
    Column("id", String(32), primary_key=True),
    Column("device", String(63), nullable=False),
    Column("detector", String(40), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("start", DateTime(timezone=True), nullable=False),
    Column("end", DateTime(timezone=True), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("level", Float, nullable=False),
    Column("received", DateTime(timezone=True), nullable=False),
    # The alert as the device sent it (``agent.edge.alerts``), detail included; its clip
    # as a summary (``store.stored_body``).
    Column("body", JSON, nullable=False),
    # The alert's audio clip, sealed to the relay's clip key (``agent.edge.clip``): only
    # ciphertext at rest.
    Column("clip", LargeBinary, nullable=True),
    # Acknowledged (the dashboard, the API): when, and by which API token's name. The
    # first acknowledgement stands.
    Column("acked", DateTime(timezone=True), nullable=True),
    Column("acked_by", String(200), nullable=True),
    Index("ix_alerts_received", "received"),
    Index("ix_alerts_device_received", "device", "received"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # 128 random bits, hex: the ``X-Edge-Intercom-Delivery`` header, the same on every try.
    Column("id", String(32), primary_key=True),
    Column("webhook", String(2000), nullable=False),
    # The relay worker that queued it and resumes it after a restart.
    Column("worker", String(200), nullable=False),
    Column("device", String(63), nullable=False),
    Column("alert_id", String(32), nullable=False),
    Column("alert", JSON, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("tries", Integer, nullable=False),
    # ``pending`` until delivered (the row is then deleted) or ``dead`` (a dead letter);
    # ``retry``: a dead letter an operator sent again, until its worker takes it up.
    Column("state", String(16), nullable=False),
    Column("reason", String(300), nullable=True),
    Column("dead_at", DateTime(timezone=True), nullable=True),
    Index("ix_webhook_deliveries_state_worker", "state", "worker", "created"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    # Short and public: what ``token list`` shows and ``token revoke`` takes.
    Column("id", String(16), primary_key=True),
    # SHA-256 of the token (``cloud_relay.tokens``): the store never holds a usable token,
    # and a request's token is found by its digest.
    Column("digest", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("expires", DateTime(timezone=True), nullable=True),
    Column("last_used", DateTime(timezone=True), nullable=True),
    Column("revoked", DateTime(timezone=True), nullable=True),
)

users = Table(
    "users",
    metadata,
    # Dashboard administrators (``edge-intercom-relay user add``).
    Column("name", String(64), primary_key=True),
    # ``scrypt$n$r$p$salt$hash`` (``cloud_relay.users``): never the password.
    Column("password", String(300), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("changed", DateTime(timezone=True), nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    # SHA-256 of the session cookie (``cloud_relay.sessions``): the store never holds one.
    Column("digest", String(64), primary_key=True),
    Column("user", String(64), ForeignKey("users.name"), nullable=False),
    # The synchronizer CSRF token: useless without the cookie, so kept as it is.
    Column("csrf", String(64), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
    Index("ix_sessions_user", "user"),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device", String(63), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    # The record's ``event`` (``call-ended``, ``selftest``, ...), "" when it has none.
    Column("event", String(40), nullable=False),
    Column("record", JSON, nullable=False),
    Index("ix_telemetry_device_at", "device", "at"),
)
