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
from connector.decisions import CurrentEvent, MappingState
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, utcnow


class LeaseLostError(RuntimeError):
    """Another worker took over the booking while this one was syncing it."""


def find_due_bookings(engine: Engine, limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Return bookings that have a due pending delivery and no live lease, oldest work first."""
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
        .order_by(func.min(Delivery.id))
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
    """Take the booking's lease if it is free, expired, or already ours."""
    now = utcnow()
    expires_at = now + timedelta(seconds=seconds)
    with engine.begin() as connection:
        taken = connection.execute(
            update(BookingLease)
            .where(
                BookingLease.booking_id == booking_id,
                or_(BookingLease.expires_at <= now, BookingLease.owner == owner),
            )
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


def schedule_retry(engine: Engine, deliveries: list[Delivery], error: str, delays: list[float | None]) -> None:
    """Record a failed attempt: each delivery waits its delay, or fails for good when it is None."""
    now = utcnow()
    with engine.begin() as connection:
        for delivery, delay in zip(deliveries, delays):
            values: dict = {"attempts": Delivery.attempts + 1, "last_error": error}
            if delay is None:
                values.update(state=DeliveryState.FAILED, outcome=error, finished_at=now)
            else:
                values.update(next_attempt_at=now + timedelta(seconds=delay))
            connection.execute(update(Delivery).where(Delivery.id == delivery.id).values(**values))
