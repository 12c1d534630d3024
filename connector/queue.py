"""The delivery queue as the worker sees it: due bookings, leases, and recording outcomes.

A worker owns a booking while it holds that booking's lease, a row in `booking_leases` taken with
a conditional update or insert, so it is safe across threads, processes and databases. A lease
whose worker died expires and is taken over.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session
from sqlmodel import select as sqlmodel_select

from connector.calendars.base import Target
from connector.decisions import CurrentEvent, MappingState, is_newer
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, read_only, utcnow


class LeaseLostError(RuntimeError):
    """Another worker took over the booking while this one was syncing it."""


def find_due_bookings(engine: Engine, limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Return bookings that have a due pending delivery and no live lease, longest due first.

    Ordering by due time rather than by arrival keeps a booking that fails again and again from
    getting ahead of deliveries that became due before its retry did.
    """
    now = utcnow()
    live_lease = select(BookingLease.booking_id).where(BookingLease.expires_at > now)
    query = (
        select(Delivery.booking_id, Delivery.next_attempt_at, Delivery.id)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at <= now,
            Delivery.booking_id.is_not(None),
            Delivery.booking_id.not_in(live_lease),
        )
        .order_by(Delivery.next_attempt_at, Delivery.id)
    )

    # Deliveries are read in due order through the `ix_deliveries_due` index, a page at a time,
    # until `limit` bookings are found: a booking's first delivery in that order is its longest
    # due one. Grouping all pending deliveries by booking instead made every call cost time in
    # proportion to the whole backlog.
    page_size = max(64, 4 * (limit + len(exclude)))
    found: list[str] = []
    seen = set(exclude)
    with read_only(engine).begin() as connection:
        after: tuple[datetime, int] | None = None
        while len(found) < limit:
            page_query = query if after is None else query.where(tuple_(Delivery.next_attempt_at, Delivery.id) > after)
            rows = connection.execute(page_query.limit(page_size)).all()
            for booking_id, _, _ in rows:
                if booking_id not in seen:
                    seen.add(booking_id)
                    found.append(booking_id)
            if len(rows) < page_size:
                break
            after = (rows[-1].next_attempt_at, rows[-1].id)
    return found[:limit]


def next_due_time(engine: Engine) -> datetime | None:
    """Return when the earliest waiting delivery becomes due, if any is waiting."""
    query = select(func.min(Delivery.next_attempt_at)).where(Delivery.state == DeliveryState.PENDING)
    with read_only(engine).begin() as connection:
        return connection.execute(query).scalar()


def acquire_lease(engine: Engine, booking_id: str, owner: str, seconds: float) -> bool:
    """Take the booking's lease if it is free or expired; see `acquire_leases`."""
    return bool(acquire_leases(engine, [booking_id], owner, seconds))


def acquire_leases(engine: Engine, booking_ids: Sequence[str], owner: str, seconds: float) -> list[str]:
    """Take the leases of the bookings that are free or expired; return those taken, in the given order.

    One statement takes them all: an insert that, for a booking with a lease row already, updates
    the row only if the lease has expired, and returns the bookings it inserted or updated.

    A live lease is never taken again, not even by its own owner: the threads of one worker
    share the owner id, so a re-entrant lease would let two of them sync the same booking.
    On PostgreSQL (READ COMMITTED) two concurrent takeovers of an expired lease serialize on the
    row lock, and the second re-checks `expires_at` against the first one's new value and fails.

    NOTE: expiry compares times written by different hosts' clocks, so a worker whose clock runs
    S seconds fast takes over expired-looking leases S seconds early; keep clocks synchronized.
    """
    requested = list(dict.fromkeys(booking_ids))
    if not requested:
        return []

    now = utcnow()
    expires_at = now + timedelta(seconds=seconds)
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(BookingLease)
        .values([{"booking_id": booking_id, "owner": owner, "expires_at": expires_at} for booking_id in requested])
        .on_conflict_do_update(
            index_elements=[BookingLease.booking_id],
            set_={"owner": owner, "expires_at": expires_at},
            where=BookingLease.expires_at <= now,
        )
        .returning(BookingLease.booking_id)
    )
    with engine.begin() as connection:
        acquired = set(connection.execute(statement).scalars())
    return [booking_id for booking_id in requested if booking_id in acquired]


def release_lease(engine: Engine, booking_id: str, owner: str) -> None:
    """Give the booking's lease back, if it is still ours."""
    with engine.begin() as connection:
        connection.execute(
            delete(BookingLease).where(BookingLease.booking_id == booking_id, BookingLease.owner == owner)
        )


def release_lease_if_idle(connection: Connection, booking_id: str, owner: str) -> bool:
    """Give the booking's lease back inside a transaction, unless it has a pending delivery due now.

    Returns whether the lease was given back. A delivery stored after this check is found by the
    next search for due bookings, because the booking then has no lease.
    """
    due = connection.execute(
        select(Delivery.id)
        .where(
            Delivery.booking_id == booking_id,
            Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at <= utcnow(),
        )
        .limit(1)
    ).first()
    if due is not None:
        return False
    connection.execute(delete(BookingLease).where(BookingLease.booking_id == booking_id, BookingLease.owner == owner))
    return True


def renew_lease(connection: Connection, booking_id: str, owner: str, seconds: float) -> None:
    """Extend the lease inside a transaction; raise LeaseLostError if another worker has it."""
    renewed = connection.execute(
        update(BookingLease)
        .where(BookingLease.booking_id == booking_id, BookingLease.owner == owner)
        .values(expires_at=utcnow() + timedelta(seconds=seconds))
    ).rowcount
    if not renewed:
        raise LeaseLostError(f"lease on booking {booking_id} was taken over by another worker")


def renew_leases(engine: Engine, booking_ids: set[str] | frozenset[str], owner: str, seconds: float) -> int:
    """Extend the leases this owner holds on the given bookings; return how many it still held."""
    if not booking_ids:
        return 0
    with engine.begin() as connection:
        return connection.execute(
            update(BookingLease)
            .where(BookingLease.booking_id.in_(booking_ids), BookingLease.owner == owner)
            .values(expires_at=utcnow() + timedelta(seconds=seconds))
        ).rowcount


def load_pending(engine: Engine, booking_id: str) -> list[Delivery]:
    """Return the booking's pending deliveries, oldest snapshot first."""
    query = (
        sqlmodel_select(Delivery)
        .where(Delivery.booking_id == booking_id, Delivery.state == DeliveryState.PENDING)
        .order_by(Delivery.version, Delivery.rank, Delivery.id)
    )
    with Session(read_only(engine), expire_on_commit=False) as session:
        deliveries = list(session.exec(query).all())
        session.expunge_all()
    return deliveries


def load_current(engine: Engine, booking_id: str) -> CurrentEvent:
    """Return what the mapping table says is in the calendar for a booking."""
    with Session(read_only(engine)) as session:
        mapping = session.get(BookingMapping, booking_id)
    return to_current(mapping)


def to_current(mapping: BookingMapping | None) -> CurrentEvent:
    """Convert a mapping row into the decision module's view of it."""
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


def write_mapping(session: Session, change: MappingUpdate) -> None:
    """Insert or update a booking's mapping row within the session's transaction."""
    mapping = session.get(BookingMapping, change.booking_id)
    if mapping is None:
        mapping = BookingMapping(booking_id=change.booking_id)
    mapping.state = change.state.value
    mapping.calendar_id = change.target.calendar_id if change.target else None
    mapping.acting_user = change.target.acting_user if change.target else None
    mapping.event_id = change.event_id
    mapping.generation = change.generation
    mapping.version = change.version
    mapping.rank = change.rank
    mapping.field_digests = json.dumps(change.field_digests, sort_keys=True)
    mapping.event_digest = change.event_digest
    mapping.carried_to = change.carried_to
    if change.last_delivery_id is not None:
        mapping.last_delivery_id = change.last_delivery_id
    mapping.updated_at = utcnow()
    session.add(mapping)


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
    with Session(engine) as session:
        saved = {
            saved_id: _column_values(session.get(BookingMapping, saved_id))
            for saved_id in (booking_id, predecessor_id) if saved_id is not None
        }
        mapping = session.get(BookingMapping, booking_id) or BookingMapping(booking_id=booking_id, version=None)
        mapping.state = MappingState.LIVE.value
        mapping.calendar_id = target.calendar_id
        mapping.acting_user = target.acting_user
        mapping.event_id = event_id
        mapping.generation = generation
        mapping.field_digests = "{}"
        mapping.event_digest = None
        mapping.updated_at = utcnow()
        session.add(mapping)
        if predecessor_id is not None:
            write_mapping(session, carried_over(predecessor_id, booking_id))
        session.commit()
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


def _column_values(mapping: BookingMapping | None) -> dict[str, Any] | None:
    if mapping is None:
        return None
    return {column: getattr(mapping, column) for column in BookingMapping.__table__.columns.keys()}


def unsettled_since(engine: Engine, booking_id: str) -> datetime | None:
    """Return when the booking's pending delivery that already failed once is tried again, if it has one.

    Such a booking's calendar state is uncertain: its last sync may have written an event whose
    response was lost.
    """
    query = select(func.min(Delivery.next_attempt_at)).where(
        Delivery.booking_id == booking_id,
        Delivery.state == DeliveryState.PENDING,
        Delivery.last_error.is_not(None),
    )
    with read_only(engine).begin() as connection:
        return connection.execute(query).scalar()


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


def finish_deliveries(session: Session, outcomes: dict[int, tuple[str, str]]) -> None:
    """Set each delivery's final state and outcome text, keyed by row id."""
    now = utcnow()
    for row_id, (state, outcome) in outcomes.items():
        session.execute(
            update(Delivery)
            .where(Delivery.id == row_id)
            .values(state=state, outcome=outcome, finished_at=now, last_error=None if state != DeliveryState.FAILED else outcome)
            .execution_options(synchronize_session=False)
        )


def supersede_failed(session: Session, booking_id: str, version: str, rank: int, by_delivery: str) -> None:
    """Mark the booking's failed deliveries older than an applied snapshot as stale."""
    session.execute(
        update(Delivery)
        .where(
            Delivery.booking_id == booking_id,
            Delivery.state == DeliveryState.FAILED,
            or_(Delivery.version < version, and_(Delivery.version == version, Delivery.rank <= rank)),
        )
        .values(state=DeliveryState.STALE, outcome=f"superseded by delivery {by_delivery}", finished_at=utcnow())
        # The session contains no Delivery objects to update, so matching its objects against
        # this WHERE clause in Python would be work for nothing on every sync.
        .execution_options(synchronize_session=False)
    )


def schedule_retry(session: Session, row_id: int, error: str, delay_seconds: float, *, counted: bool) -> None:
    """Record a failed attempt of a delivery, due again `delay_seconds` from now.

    An attempt that is not `counted` (a rate limit, a paused calendar, a busy booking) leaves the
    attempt count alone, so it never brings the delivery closer to failing.
    """
    values: dict = {"last_error": error, "next_attempt_at": utcnow() + timedelta(seconds=delay_seconds)}
    if counted:
        values["attempts"] = Delivery.attempts + 1
    session.execute(update(Delivery).where(Delivery.id == row_id).values(**values))


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of `replay_delivery` for one delivery, in words for the operator."""

    delivery_id: str
    queued: bool
    message: str


def replay_delivery(session: Session, delivery: Delivery) -> ReplayResult:
    """Queue a delivery again if its snapshot could still change the calendar, within the session.

    Applies the snapshot version rule up front, so replaying a delivery that is applied, or that a
    newer applied snapshot made stale, changes nothing at all, not even the delivery's state.
    """
    def result(queued: bool, message: str) -> ReplayResult:
        return ReplayResult(delivery.delivery_id, queued, message)

    if delivery.booking_id is None or delivery.state == DeliveryState.IGNORED:
        return result(False, f"not queued: {delivery.event} is not a booking event, so there is nothing to apply")
    if delivery.state == DeliveryState.PENDING:
        delivery.next_attempt_at = utcnow()
        session.add(delivery)
        return result(True, f"already pending after {delivery.attempts} attempts; now due at once")
    if delivery.body is None:
        return result(False, "not queued: its payload was pruned, so it cannot be applied again")

    mapping = session.get(BookingMapping, delivery.booking_id)
    current = to_current(mapping)
    if current.state is MappingState.CARRIED_OVER:
        return result(False, f"not queued: booking {delivery.booking_id} was rescheduled into {current.carried_to}, "
                             "so its own snapshots change nothing")
    if not is_newer(delivery.version, delivery.rank, current):
        if delivery.state == DeliveryState.APPLIED:
            return result(False, f"not queued: already applied to booking {delivery.booking_id}, which has this "
                                 "snapshot or a newer one, so replaying it would change nothing")
        return result(False, f"not queued: booking {delivery.booking_id} has a newer snapshot applied "
                             f"(delivery {mapping.last_delivery_id}), so this one would change nothing")

    was = delivery.state if delivery.state != DeliveryState.FAILED else f"failed after {delivery.attempts} attempts"
    previous = delivery.last_error or delivery.outcome
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.finished_at = None
    delivery.last_error = None
    delivery.outcome = f"replayed; was {was}: {previous}" if previous else f"replayed; was {was}"
    session.add(delivery)
    return result(True, f"queued again (was {was})")
