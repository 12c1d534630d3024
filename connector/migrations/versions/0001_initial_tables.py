"""Create the initial tables: deliveries, booking mappings and leases, and the ics backend's.

Revision ID: 0001
Revises:
Create Date: 2026-03-20

Databases created before migrations existed, by `SQLModel.metadata.create_all`, already hold
some or all of these tables with the same columns. This migration creates only the missing
ones, so such a database is adopted by a first `proximity-sync db upgrade`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = _existing_tables()

    if "deliveries" not in existing:
        op.create_table(
            "deliveries",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("delivery_id", sa.String(length=200), nullable=False),
            sa.Column("body_digest", sa.String(length=64), nullable=False),
            sa.Column("event", sa.String(length=100), nullable=False),
            sa.Column("version", sa.String(length=40), nullable=False),
            sa.Column("rank", sa.Integer(), nullable=False),
            sa.Column("booking_id", sa.String(length=200), nullable=True),
            sa.Column("body", sa.LargeBinary(), nullable=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("state", sa.String(length=20), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("outcome", sa.Text(), nullable=True),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("delivery_id"),
            sa.UniqueConstraint("body_digest"),
        )
        op.create_index("ix_deliveries_booking_id", "deliveries", ["booking_id"])
        op.create_index("ix_deliveries_due", "deliveries", ["state", "next_attempt_at"])

    if "booking_mappings" not in existing:
        op.create_table(
            "booking_mappings",
            sa.Column("booking_id", sa.String(length=200), nullable=False),
            sa.Column("calendar_id", sa.String(length=300), nullable=True),
            sa.Column("acting_user", sa.String(length=300), nullable=True),
            sa.Column("event_id", sa.String(length=1024), nullable=True),
            sa.Column("generation", sa.Integer(), nullable=False),
            sa.Column("state", sa.String(length=20), nullable=False),
            sa.Column("version", sa.String(length=40), nullable=True),
            sa.Column("rank", sa.Integer(), nullable=False),
            sa.Column("event_digest", sa.String(length=64), nullable=True),
            sa.Column("field_digests", sa.Text(), nullable=False),
            sa.Column("carried_to", sa.String(length=200), nullable=True),
            sa.Column("last_delivery_id", sa.String(length=200), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("booking_id"),
        )

    if "booking_leases" not in existing:
        op.create_table(
            "booking_leases",
            sa.Column("booking_id", sa.String(length=200), nullable=False),
            sa.Column("owner", sa.String(length=200), nullable=False),
            sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("booking_id"),
        )

    if "ics_events" not in existing:
        op.create_table(
            "ics_events",
            sa.Column("calendar_id", sa.String(), nullable=False),
            sa.Column("event_id", sa.String(), nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("status", sa.String(), nullable=False),
            sa.Column("booking_id", sa.String(), nullable=True),
            sa.Column("sequence", sa.Integer(), nullable=False),
            sa.Column("etag", sa.String(), nullable=False),
            sa.Column("created", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("calendar_id", "event_id"),
        )
        op.create_index("ix_ics_events_calendar_booking", "ics_events", ["calendar_id", "booking_id"])

    if "ics_feeds" not in existing:
        op.create_table(
            "ics_feeds",
            sa.Column("calendar_id", sa.String(), nullable=False),
            sa.Column("token", sa.String(), nullable=False),
            sa.Column("created", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("calendar_id"),
            sa.UniqueConstraint("token"),
        )


def downgrade() -> None:
    op.drop_table("ics_feeds")
    op.drop_index("ix_ics_events_calendar_booking", table_name="ics_events")
    op.drop_table("ics_events")
    op.drop_table("booking_leases")
    op.drop_table("booking_mappings")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_index("ix_deliveries_booking_id", table_name="deliveries")
    op.drop_table("deliveries")


def _existing_tables() -> set[str]:
    """Return the names of the tables already in the target schema (none when rendering SQL)."""
    if context.is_offline_mode():
        return set()
    return set(sa.inspect(op.get_bind()).get_table_names())
