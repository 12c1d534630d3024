"""Rows of `booking_mappings`: what the connector has written to a calendar for each booking.

The worker reads a booking's row before it decides on a calendar call, and writes it in the
transaction that records the outcome. Its statements are built once, like the queue's (see
connector/queue.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.sql import Executable
from sqlmodel import Session

from connector.calendars.base import Target
from connector.decisions import CurrentEvent, MappingState
from connector.storage import BookingMapping, read_only, upsert_insert, utcnow

MAPPINGS = BookingMapping.__table__

SELECT_MAPPING = select(MAPPINGS).where(MAPPINGS.c.booking_id == bindparam("booking"))

# The columns a sync sets in a booking's mapping row. `created_at` is set only when the row is new.
_SYNCED_COLUMNS = (
    "state", "calendar_id", "acting_user", "event_id", "generation", "version", "rank", "field_digests",
    "event_digest", "carried_to", "last_delivery_id", "updated_at",
)

# The columns `record_insert_intent` sets: the event's place, without the applied version.
_INTENT_COLUMNS = ("state", "calendar_id", "acting_user", "event_id", "generation", "field_digests", "event_digest", "updated_at")


@cache
def _mapping_upsert(dialect: str, columns: tuple[str, ...]) -> Executable:
    """Return an insert of a whole mapping row that, for a booking with a row already, updates `columns`.

    `last_delivery_id` keeps its old value when the new one is NULL.
    """
    statement = upsert_insert(dialect, MAPPINGS)
    new = statement.excluded
    changes = {column: new[column] for column in columns}
    if "last_delivery_id" in changes:
        changes["last_delivery_id"] = func.coalesce(new.last_delivery_id, MAPPINGS.c.last_delivery_id)
    return statement.on_conflict_do_update(index_elements=[MAPPINGS.c.booking_id], set_=changes)


def load_current(engine: Engine, booking_id: str) -> CurrentEvent:
    """Return what the mapping table says is in the calendar for a booking."""
    with read_only(engine).begin() as connection:
        mapping = connection.execute(SELECT_MAPPING, {"booking": booking_id}).first()
    return to_current(mapping)


def to_current(mapping: BookingMapping | Row | None) -> CurrentEvent:
    """Convert a mapping row, as an object or a result row, into the decision module's view of it."""
    if mapping is None:
        return CurrentEvent(MappingState.NONE)
    target = Target(mapping.calendar_id, mapping.acting_user) if mapping.calendar_id else None
    return CurrentEvent(
        state=MappingState(mapping.state),
        target=target,
        event_id=mapping.event_id,
        generation=mapping.generation,
        version=mapping.version,
        rank=mapping.rank,
        field_digests=json.loads(mapping.field_digests or "{}"),
        carried_to=mapping.carried_to,
    )


@dataclass(frozen=True)
class MappingUpdate:
    """The new mapping row of one booking after a sync."""

    booking_id: str
    state: MappingState
    target: Target | None
    event_id: str | None
    generation: int
    version: str | None
    rank: int
    field_digests: dict[str, str]
    event_digest: str | None
    carried_to: str | None = None
    last_delivery_id: str | None = None


def write_mapping(connection: Connection, change: MappingUpdate) -> None:
    """Insert or update a booking's mapping row within the connection's transaction."""
    now = utcnow()
    row = {
        "booking_id": change.booking_id,
        "state": change.state.value,
        "calendar_id": change.target.calendar_id if change.target else None,
        "acting_user": change.target.acting_user if change.target else None,
        "event_id": change.event_id,
        "generation": change.generation,
        "version": change.version,
        "rank": change.rank,
        "field_digests": json.dumps(change.field_digests, sort_keys=True),
        "event_digest": change.event_digest,
        "carried_to": change.carried_to,
        "last_delivery_id": change.last_delivery_id,
        "created_at": now,
        "updated_at": now,
    }
    connection.execute(_mapping_upsert(connection.dialect.name, _SYNCED_COLUMNS), row)


# Mapping rows as they were before `record_insert_intent` changed them: column values by booking
# id, or None for a booking that had no row.
SavedMappings = dict[str, dict[str, Any] | None]


def record_insert_intent(
    engine: Engine,
    booking_id: str,
    target: Target,
    event_id: str,
    generation: int,
    predecessor_id: str | None = None,
) -> SavedMappings:
    """Record, before an insert is sent, that the booking's event may now exist under `event_id`.

    The row marks the event live but keeps the applied version, so the snapshot being applied
    is still newer next time. It drops the field digests, so that next time every field is
    written. If the insert's response is lost, or the worker dies, the next sync of the booking,
    or of a booking rescheduled from it, finds the event instead of creating a second one. If the
    insert was never stored, that sync learns so from the calendar (404) and inserts the same id.

    A `predecessor_id` (the booking this one was rescheduled from) is marked carried over in the
    same transaction, so that its own later snapshots cannot create an event beside this one.
    Returns the rows as they were, for `restore_mappings` once the insert failed for certain.
    """
    now = utcnow()
    row = {
        "booking_id": booking_id,
        "state": MappingState.LIVE.value,
        "calendar_id": target.calendar_id,
        "acting_user": target.acting_user,
        "event_id": event_id,
        "generation": generation,
        "version": None,
        "rank": 0,
        "field_digests": "{}",
        "event_digest": None,
        "carried_to": None,
        "last_delivery_id": None,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as connection:
        saved = {
            saved_id: _column_values(connection.execute(SELECT_MAPPING, {"booking": saved_id}).first())
            for saved_id in (booking_id, predecessor_id) if saved_id is not None
        }
        connection.execute(_mapping_upsert(connection.dialect.name, _INTENT_COLUMNS), row)
        if predecessor_id is not None:
            write_mapping(connection, carried_over(predecessor_id, booking_id))
    return saved


def restore_mappings(engine: Engine, saved: SavedMappings) -> None:
    """Put mapping rows back as `record_insert_intent` found them."""
    with Session(engine) as session:
        for booking_id, values in saved.items():
            mapping = session.get(BookingMapping, booking_id)
            if values is None:
                if mapping is not None:
                    session.delete(mapping)
                continue
            mapping = mapping or BookingMapping(booking_id=booking_id)
            for column, value in values.items():
                setattr(mapping, column, value)
            session.add(mapping)
        session.commit()


def _column_values(mapping: Row | None) -> dict[str, Any] | None:
    return None if mapping is None else dict(mapping._mapping)


def carried_over(booking_id: str, successor_id: str) -> MappingUpdate:
    """Return the mapping of a booking whose event now belongs to the booking rescheduled from it."""
    return MappingUpdate(
        booking_id=booking_id,
        state=MappingState.CARRIED_OVER,
        target=None,
        event_id=None,
        generation=0,
        version=None,
        rank=0,
        field_digests={},
        event_digest=None,
        carried_to=successor_id,
    )
