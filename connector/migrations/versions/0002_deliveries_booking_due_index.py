"""Index deliveries by booking, state and due time, in place of the index by booking alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

The worker reads a booking's pending deliveries with `booking_id = ? AND state = ?`, and the due
ones with a range on `next_attempt_at` as well. With only `ix_deliveries_booking_id`, SQLite's
planner (3.40, without ANALYZE statistics) chose `ix_deliveries_due` (state, next_attempt_at) for
those queries and read every pending delivery of every booking, so each sync took longer as the
backlog grew. With all three columns in one index, the planner takes it.

Like 0001, this adopts a database made by `SQLModel.metadata.create_all`: it creates the new
index only where it is missing, and drops the old one only where it exists.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NEW_INDEX = "ix_deliveries_booking_due"
OLD_INDEX = "ix_deliveries_booking_id"


def upgrade() -> None:
    existing = _existing_indexes()

    if context.is_offline_mode() or NEW_INDEX not in existing:
        op.create_index(NEW_INDEX, "deliveries", ["booking_id", "state", "next_attempt_at"])
    if context.is_offline_mode() or OLD_INDEX in existing:
        op.drop_index(OLD_INDEX, table_name="deliveries")


def downgrade() -> None:
    op.create_index(OLD_INDEX, "deliveries", ["booking_id"])
    op.drop_index(NEW_INDEX, table_name="deliveries")


def _existing_indexes() -> set[str]:
    """Return the names of the deliveries table's indexes (none when rendering SQL)."""
    if context.is_offline_mode():
        return set()
    return {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("deliveries")}
