"""The delivery queue as the worker sees it: due bookings, leases, and recording outcomes.

A worker owns a booking while it holds that booking's lease, a row in `booking_leases` taken with
a conditional update or insert, so it is safe across threads, processes and databases. A lease
whose worker died expires and is taken over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from sqlmodel import select as sqlmodel_select

from connector.calendars.base import Target
from connector.decisions import CurrentEvent, MappingState, is_newer
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, utcnow


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
        select(Delivery.booking_id)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at <= now,
            Delivery.booking_id.is_not(None),
            Delivery.booking_id.not_in(live_lease),
        )
        .group_by(Delivery.booking_id)
        .order_by(func.min(Delivery.next_attempt_at))
        .limit(limit + len(exclude))
    )
    with engine.begin() as connection:
        booking_ids = connection.execute(query).scalars().all()
    return [booking_id for booking_id in booking_ids if booking_id not in exclude][:limit]


def next_due_time(engine: Engine) -> datetime | None:
    """Return when the earliest waiting delivery becomes due, if any is waiting."""
    query = select(func.min(Delivery.next_attempt_at)).where(Delivery.state == DeliveryState.PENDING)
    with engine.begin() as connection:
        return connection.execute(query).scalar()


def acquire_lease(engine: Engine, booking_id: str, owner: str, seconds: float) -> bool:
    """Take the booking's lease if it is free or expired.

    A live lease is never taken again, not even by its own owner: the threads of one worker
    share the owner id, so a re-entrant lease would let two of them sync the same booking.
    On PostgreSQL (READ COMMITTED) two concurrent takeovers of an expired lease serialize on the
    row lock, and the second re-checks `expires_at` against the first one's new value and fails.

    NOTE: expiry compares times written by different hosts' clocks, so a worker whose clock runs
    S seconds fast takes over expired-looking leases S seconds early; keep clocks synchronized.
    """
    now = utcnow()
    expires_at = now + timedelta(seconds=seconds)
    with engine.begin() as connection:
        taken = connection.execute(
            update(BookingLease)
            .where(BookingLease.booking_id == booking_id, BookingLease.expires_at <= now)
            .values(owner=owner, expires_at=expires_at)
        ).rowcount
    if taken:
        return True

    try:
        with engine.begin() as connection:
            connection.execute(
                BookingLease.__table__.insert().values(booking_id=booking_id, owner=owner, expires_at=expires_at)
            )
    except IntegrityError:
        return False
    return True


def release_lease(engine: Engine, booking_id: str, owner: str) -> None:
    """Give the booking's lease back, if it is still ours."""
    with engine.begin() as connection:
        connection.execute(
            delete(BookingLease).where(BookingLease.booking_id == booking_id, BookingLease.owner == owner)
        )


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
    with Session(engine, expire_on_commit=False) as session:
        deliveries = list(session.exec(query).all())
        session.expunge_all()
    return deliveries


def load_current(engine: Engine, booking_id: str) -> CurrentEvent:
    """Return what the mapping table says is in the calendar for a booking."""
    with Session(engine) as session:
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


def record_insert_intent(engine: Engine, booking_id: str, target: Target, event_id: str, generation: int) -> None:
    """Record, before an insert is sent, that the booking's event may now exist under `event_id`.

    The row says the event is live but keeps the applied version, so the snapshot being applied
    is still newer next time, and forgets the field digests, so that next time every field is
    written. If the insert's response is lost, or the worker dies, the next sync of the booking,
    or of a booking rescheduled from it, finds the event instead of creating a second one. If the
    insert was never stored, that sync learns so from the calendar (404) and inserts the same id.
    """
    with Session(engine) as session:
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
        session.commit()


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
    with engine.begin() as connection:
        return connection.execute(query).scalar()


def finish_deliveries(session: Session, outcomes: dict[int, tuple[str, str]]) -> None:
    """Set each delivery's final state and outcome text, keyed by row id."""
    now = utcnow()
    for row_id, (state, outcome) in outcomes.items():
        session.execute(
            update(Delivery)
            .where(Delivery.id == row_id)
            .values(state=state, outcome=outcome, finished_at=now, last_error=None if state != DeliveryState.FAILED else outcome)
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
    """What `replay_delivery` did with one delivery, in words for the operator."""

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
