"""The delivery queue as the worker sees it: due bookings, leases, and recording outcomes.

A worker owns a booking while it holds that booking's lease, a row in `booking_leases` taken with
a conditional update or insert, so it is safe across threads, processes and databases. A lease
whose worker died expires and is taken over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import and_, bindparam, delete, exists, func, or_, select, tuple_, update
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.sql import Executable
from sqlmodel import Session

from connector.calendars.base import Target
from connector.decisions import CurrentEvent, MappingState, is_newer
from connector.mapping_rows import MAPPINGS, SELECT_MAPPING, to_current
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, read_only, upsert_insert, utcnow


class LeaseLostError(RuntimeError):
    """Another worker took over the booking while this one was syncing it."""


DELIVERIES = Delivery.__table__
LEASES = BookingLease.__table__

# The statements that every booking change runs are built once, here, from the tables' columns,
# so SQLAlchemy finds each one's compiled SQL in its cache without building a cache key first.
# Statements built per call, run through ORM sessions, took more than half of the worker's CPU
# time per change (docs/benchmarks.md).

_SELECT_PENDING = (
    select(
        DELIVERIES.c.id, DELIVERIES.c.delivery_id, DELIVERIES.c.event, DELIVERIES.c.version, DELIVERIES.c.rank,
        DELIVERIES.c.booking_id, DELIVERIES.c.body, DELIVERIES.c.attempts, DELIVERIES.c.next_attempt_at,
    )
    .where(DELIVERIES.c.booking_id == bindparam("booking"), DELIVERIES.c.state == DeliveryState.PENDING)
    .order_by(DELIVERIES.c.version, DELIVERIES.c.rank, DELIVERIES.c.id)
)

# The body of the pending snapshot a booking's sync applies. The dispatcher reads it to route a
# booking without a mapping, up to MAX_ROUTES_PER_DISPATCH times per search.
_SELECT_NEWEST_PENDING_BODY = (
    select(DELIVERIES.c.body)
    .where(DELIVERIES.c.booking_id == bindparam("booking"), DELIVERIES.c.state == DeliveryState.PENDING)
    .order_by(DELIVERIES.c.version.desc(), DELIVERIES.c.rank.desc(), DELIVERIES.c.id)
    .limit(1)
)

_SELECT_DUE = (
    select(
        DELIVERIES.c.booking_id, DELIVERIES.c.next_attempt_at, DELIVERIES.c.id, MAPPINGS.c.calendar_id,
        MAPPINGS.c.acting_user,
    )
    .select_from(DELIVERIES.outerjoin(MAPPINGS, MAPPINGS.c.booking_id == DELIVERIES.c.booking_id))
    .where(
        DELIVERIES.c.state == DeliveryState.PENDING,
        DELIVERIES.c.next_attempt_at <= bindparam("now"),
        DELIVERIES.c.booking_id.is_not(None),
        DELIVERIES.c.booking_id.not_in(select(LEASES.c.booking_id).where(LEASES.c.expires_at > bindparam("now"))),
    )
    .order_by(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id)
    .limit(bindparam("page_size"))
)

# The next page of `_SELECT_DUE`, after the last (due time, row id) read.
_SELECT_DUE_AFTER = _SELECT_DUE.where(
    tuple_(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id) > tuple_(
        bindparam("after_time", type_=DELIVERIES.c.next_attempt_at.type), bindparam("after_id", type_=DELIVERIES.c.id.type)
    )
)

_RENEW_LEASE = (
    update(LEASES)
    .where(LEASES.c.booking_id == bindparam("booking"), LEASES.c.owner == bindparam("lease_owner"))
    .values(expires_at=bindparam("new_expiry"))
)

_RELEASE_LEASE = delete(LEASES).where(
    LEASES.c.booking_id == bindparam("booking"), LEASES.c.owner == bindparam("lease_owner")
)

_RELEASE_LEASE_IF_IDLE = delete(LEASES).where(
    LEASES.c.booking_id == bindparam("booking"),
    LEASES.c.owner == bindparam("lease_owner"),
    ~exists().where(
        DELIVERIES.c.booking_id == bindparam("booking"),
        DELIVERIES.c.state == DeliveryState.PENDING,
        DELIVERIES.c.next_attempt_at <= bindparam("now"),
    ),
)

_FINISH_DELIVERY = (
    update(DELIVERIES)
    .where(DELIVERIES.c.id == bindparam("row_id"))
    .values(
        state=bindparam("new_state"),
        outcome=bindparam("new_outcome"),
        finished_at=bindparam("now"),
        last_error=bindparam("new_error"),
    )
)

_SUPERSEDE_FAILED = (
    update(DELIVERIES)
    .where(
        DELIVERIES.c.booking_id == bindparam("booking"),
        DELIVERIES.c.state == DeliveryState.FAILED,
        or_(
            DELIVERIES.c.version < bindparam("applied_version"),
            and_(DELIVERIES.c.version == bindparam("applied_version"), DELIVERIES.c.rank <= bindparam("applied_rank")),
        ),
    )
    .values(state=DeliveryState.STALE, outcome=bindparam("new_outcome"), finished_at=bindparam("now"))
)


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    """A pending delivery as the sync reads it: the row's columns that applying it needs."""

    id: int
    delivery_id: str
    event: str
    version: str
    rank: int
    booking_id: str
    body: bytes | None
    attempts: int
    next_attempt_at: datetime


@dataclass(frozen=True, slots=True)
class DueBooking:
    """A booking with a due pending delivery, and the calendar its mapping names, if it has one yet."""

    booking_id: str
    target: Target | None


def find_due_bookings(engine: Engine, limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Return bookings that have a due pending delivery and no live lease, longest due first; see `find_due`."""
    return [due.booking_id for due in find_due(engine, limit, exclude)]


@dataclass
class DueCursor:
    """The position from which the dispatcher's search for due bookings goes on after `max_rows` rows.

    The search reads the longest due deliveries first. When the bookings of one acting user, whose
    calls are paced, fill all of those rows, it reads one more page from here. So the bookings of
    other users further down are found after at most one search per `max_rows` rows of backlog.
    Without it they waited until that user's backlog shrank below `max_rows`. `position` is the
    (due time, row id) of the last delivery read, and None starts after the first page.
    """

    position: tuple[datetime, int] | None = None


def find_due(
    engine: Engine,
    limit: int,
    exclude: set[str] | frozenset[str] = frozenset(),
    admit: Callable[[DueBooking], bool] | None = None,
    max_rows: int | None = None,
    cursor: DueCursor | None = None,
) -> list[DueBooking]:
    """Return up to `limit` bookings that have a due pending delivery and no live lease, longest due first.

    Ordering by due time rather than by arrival keeps a booking that fails again and again from
    getting ahead of deliveries that became due before its retry did. A booking in `exclude`,
    or one that `admit` returns False for, is passed over. With `max_rows`, the search stops
    after reading that many deliveries, even if it found fewer than `limit` bookings. With a
    `cursor` too, it then reads `max_rows` more from the cursor's position and moves the cursor.
    """
    # Deliveries are read in due order through the `ix_deliveries_due` index, a page at a time,
    # until `limit` bookings are found: a booking's first delivery in that order is its longest
    # due one. Grouping all pending deliveries by booking instead made every call cost time in
    # proportion to the whole backlog. Rows are fetched one at a time, so SQLite reads no further
    # than the row that completes the list. The worker's dispatcher, which sets `max_rows`, reads
    # its whole page with one query that way: fetching pages of 64 rows with `all()` had cost it
    # 0.76 ms of CPU per call, 150 calls a second, to find one booking.
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    page_size = max_rows if max_rows is not None else max(64, 4 * (limit + len(exclude)))
    parameters = {"now": utcnow(), "page_size": page_size}
    found: list[DueBooking] = []
    seen = set(exclude)

    def offer(result: CursorResult) -> tuple[int, tuple[datetime, int] | None]:
        """Offer the bookings of one page; return how many rows were read and where reading stopped."""
        in_page = 0
        position = None
        for row in result:
            in_page += 1
            position = (row.next_attempt_at, row.id)
            if row.booking_id in seen:
                continue
            seen.add(row.booking_id)
            due = DueBooking(row.booking_id, Target(row.calendar_id, row.acting_user) if row.calendar_id else None)
            if admit is None or admit(due):
                found.append(due)
                if len(found) == limit:
                    result.close()
                    break
        return in_page, position

    def after(position: tuple[datetime, int]) -> dict:
        return {**parameters, "after_time": position[0], "after_id": position[1]}

    with read_only(engine).begin() as connection:
        result = connection.execute(_SELECT_DUE, parameters)
        read = 0
        while True:
            in_page, position = offer(result)
            read += in_page
            if len(found) == limit:
                return found
            if in_page < page_size:
                if cursor is not None:  # every due delivery was read, so the next search starts over
                    cursor.position = None
                return found
            if max_rows is not None and read >= max_rows:
                break
            result = connection.execute(_SELECT_DUE_AFTER, after(position))

        if cursor is None:
            return found
        resume_at = position if cursor.position is None else max(cursor.position, position)
        in_page, resumed_to = offer(connection.execute(_SELECT_DUE_AFTER, after(resume_at)))
        cursor.position = resumed_to if len(found) == limit or in_page == page_size else None
        return found


def newest_pending_body(engine: Engine, booking_id: str) -> bytes | None:
    """Return the body of the booking's newest pending snapshot, the one its sync applies, or None.

    Newest means the highest (version, rank), as the sync picks it, and the first stored of equals.
    """
    with read_only(engine).begin() as connection:
        return connection.execute(_SELECT_NEWEST_PENDING_BODY, {"booking": booking_id}).scalar()


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
    parameters = {f"booking_{index}": booking_id for index, booking_id in enumerate(requested)}
    parameters.update(lease_owner=owner, new_expiry=now + timedelta(seconds=seconds), now=now)
    with engine.begin() as connection:
        statement = _lease_upsert(engine.dialect.name, len(requested))
        acquired = set(connection.execute(statement, parameters).scalars())
    return [booking_id for booking_id in requested if booking_id in acquired]


# Bounded, because `acquire_leases` is public and a caller may pass any number of bookings; the
# worker passes at most one per sync thread.
@lru_cache(maxsize=64)
def _lease_upsert(dialect: str, count: int) -> Executable:
    """Return the statement of `acquire_leases` for `count` bookings, built once per count.

    Building it on every call, with the values in it, took 0.47 ms of CPU per call against 0.27 ms
    for this one (one thread taking 2,000 leases on SQLite). The dispatcher makes such a call for
    nearly every booking it starts.
    """
    new_expiry = bindparam("new_expiry", type_=LEASES.c.expires_at.type)
    rows = [
        {"booking_id": bindparam(f"booking_{index}"), "owner": bindparam("lease_owner"), "expires_at": new_expiry}
        for index in range(count)
    ]
    return (
        upsert_insert(dialect, LEASES)
        .values(rows)
        .on_conflict_do_update(
            index_elements=[LEASES.c.booking_id],
            set_={"owner": bindparam("lease_owner"), "expires_at": new_expiry},
            where=LEASES.c.expires_at <= bindparam("now", type_=LEASES.c.expires_at.type),
        )
        .returning(LEASES.c.booking_id)
    )


def release_lease(engine: Engine, booking_id: str, owner: str) -> None:
    """Give the booking's lease back, if it is still ours."""
    with engine.begin() as connection:
        hand_back_lease(connection, booking_id, owner)


def hand_back_lease(connection: Connection, booking_id: str, owner: str) -> bool:
    """Give the owner's lease on the booking back inside a transaction, even if a delivery is due.

    Returns whether the owner held the lease. The booking's due deliveries are then found by the
    next search for due bookings, by this worker or another.
    """
    return connection.execute(_RELEASE_LEASE, {"booking": booking_id, "lease_owner": owner}).rowcount == 1


def release_lease_if_idle(connection: Connection, booking_id: str, owner: str) -> bool:
    """Give the owner's lease on the booking back inside a transaction, unless a pending delivery is due now.

    Returns whether the lease was given back: False too when the owner does not hold it. A
    delivery stored after this check is found by the next search for due bookings, because the
    booking then has no lease.
    """
    parameters = {"booking": booking_id, "lease_owner": owner, "now": utcnow()}
    return connection.execute(_RELEASE_LEASE_IF_IDLE, parameters).rowcount == 1


def renew_lease(connection: Connection, booking_id: str, owner: str, seconds: float) -> None:
    """Extend the lease inside a transaction; raise LeaseLostError if another worker has it."""
    parameters = {"booking": booking_id, "lease_owner": owner, "new_expiry": utcnow() + timedelta(seconds=seconds)}
    if not connection.execute(_RENEW_LEASE, parameters).rowcount:
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


def load_booking(engine: Engine, booking_id: str) -> tuple[list[PendingDelivery], CurrentEvent]:
    """Return the booking's pending deliveries, oldest snapshot first, and its mapping, read together."""
    with read_only(engine).begin() as connection:
        pending = [PendingDelivery(*row) for row in connection.execute(_SELECT_PENDING, {"booking": booking_id})]
        mapping = connection.execute(SELECT_MAPPING, {"booking": booking_id}).first()
    return pending, to_current(mapping)


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


def finish_deliveries(connection: Connection, outcomes: dict[int, tuple[str, str]]) -> None:
    """Set each delivery's final state and outcome text, keyed by row id."""
    if not outcomes:
        return

    now = utcnow()
    rows = [
        {
            "row_id": row_id,
            "new_state": state,
            "new_outcome": outcome,
            "now": now,
            "new_error": outcome if state == DeliveryState.FAILED else None,
        }
        for row_id, (state, outcome) in outcomes.items()
    ]
    connection.execute(_FINISH_DELIVERY, rows)


def supersede_failed(connection: Connection, booking_id: str, version: str, rank: int, by_delivery: str) -> None:
    """Mark the booking's failed deliveries older than an applied snapshot as stale."""
    parameters = {
        "booking": booking_id,
        "applied_version": version,
        "applied_rank": rank,
        "new_outcome": f"superseded by delivery {by_delivery}",
        "now": utcnow(),
    }
    connection.execute(_SUPERSEDE_FAILED, parameters)


def schedule_retry(connection: Connection, row_id: int, error: str, delay_seconds: float, *, counted: bool) -> None:
    """Record a failed attempt of a delivery, due again `delay_seconds` from now.

    An attempt that is not `counted` (a rate limit, a paused calendar, a busy booking) leaves the
    attempt count alone, so it never brings the delivery closer to failing.
    """
    values: dict = {"last_error": error, "next_attempt_at": utcnow() + timedelta(seconds=delay_seconds)}
    if counted:
        values["attempts"] = Delivery.attempts + 1
    connection.execute(update(DELIVERIES).where(DELIVERIES.c.id == row_id).values(**values))


def format_attempts(count: int) -> str:
    """Return "1 attempt" or "N attempts", for messages that count a delivery's attempts."""
    return f"{count} attempt" if count == 1 else f"{count} attempts"


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
        if delivery.attempts == 0:
            return result(True, "already pending; now due at once")
        return result(True, f"already pending after {format_attempts(delivery.attempts)} failed; now due at once")
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

    if delivery.state == DeliveryState.FAILED:
        earlier = f"had failed after {format_attempts(delivery.attempts)}"
    else:
        earlier = f"was {delivery.state}"
    previous = delivery.last_error or delivery.outcome
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.finished_at = None
    delivery.last_error = None
    delivery.outcome = f"replayed; {earlier}: {previous}" if previous else f"replayed; {earlier}"
    session.add(delivery)
    return result(True, f"queued again ({earlier})")
