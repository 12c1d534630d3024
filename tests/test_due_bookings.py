"""`find_due_bookings` and leases: which bookings the dispatcher takes next, in what order, and who holds them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from connector.calendars.base import Target
from connector.queue import (
    DueBooking,
    DueCursor,
    acquire_lease,
    acquire_leases,
    find_due,
    find_due_bookings,
    hand_back_lease,
    newest_pending_body,
    release_lease_if_idle,
)
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, create_tables, make_engine, utcnow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'due.db'}", pool_size=2)
    create_tables(engine)
    yield engine
    engine.dispose()


def add_delivery(
    engine: Engine,
    booking_id: str | None,
    due_in: float,
    state: str = DeliveryState.PENDING,
    body: bytes = b"{}",
    version: str = "2026-03-16T14:05:00.000000Z",
    rank: int = 0,
) -> None:
    now = utcnow()
    add_delivery.count += 1
    with engine.begin() as connection:
        connection.execute(insert(Delivery).values(
            delivery_id=f"dlv_{add_delivery.count}",
            body_digest=f"{add_delivery.count:064d}",
            event="booking.created",
            version=version,
            rank=rank,
            booking_id=booking_id,
            body=body,
            received_at=now,
            state=state,
            attempts=0,
            next_attempt_at=now + timedelta(seconds=due_in),
        ))


add_delivery.count = 0


def test_due_bookings_longest_due_first(engine):
    add_delivery(engine, "bkg_b", -5)
    add_delivery(engine, "bkg_a", -10)
    add_delivery(engine, "bkg_b", -20)
    add_delivery(engine, "bkg_c", -1)

    assert find_due_bookings(engine, 10) == ["bkg_b", "bkg_a", "bkg_c"]
    assert find_due_bookings(engine, 2) == ["bkg_b", "bkg_a"]


def test_due_bookings_skip_not_due_finished_leased_excluded(engine):
    add_delivery(engine, "bkg_later", 60)
    add_delivery(engine, "bkg_done", -5, state=DeliveryState.APPLIED)
    add_delivery(engine, None, -5, state=DeliveryState.PENDING)
    add_delivery(engine, "bkg_leased", -5)
    add_delivery(engine, "bkg_excluded", -5)
    add_delivery(engine, "bkg_due", -5)
    assert acquire_lease(engine, "bkg_leased", "worker-other", 60)

    assert find_due_bookings(engine, 10, exclude={"bkg_excluded"}) == ["bkg_due"]


def test_due_bookings_look_past_one_busy_booking(engine):
    for index in range(300):
        add_delivery(engine, "bkg_busy", -1000 + index)
    add_delivery(engine, "bkg_next", -1)
    add_delivery(engine, "bkg_last", -0.5)

    assert find_due_bookings(engine, 3) == ["bkg_busy", "bkg_next", "bkg_last"]
    assert find_due_bookings(engine, 2, exclude={"bkg_busy"}) == ["bkg_next", "bkg_last"]


def test_find_due_names_mapped_calendar(engine):
    add_delivery(engine, "bkg_mapped", -5)
    add_delivery(engine, "bkg_new", -1)
    with engine.begin() as connection:
        connection.execute(insert(BookingMapping).values(
            booking_id="bkg_mapped", calendar_id="team@example.com", acting_user="ana@example.com", state="live",
        ))

    assert find_due(engine, 10) == [
        DueBooking("bkg_mapped", Target("team@example.com", "ana@example.com")),
        DueBooking("bkg_new", None),
    ]


def test_find_due_passes_over_bookings_not_admitted(engine):
    for index, booking_id in enumerate(["bkg_a", "bkg_b", "bkg_c", "bkg_d"]):
        add_delivery(engine, booking_id, -10 + index)
    offered: list[str] = []

    def admit(due: DueBooking) -> bool:
        offered.append(due.booking_id)
        return due.booking_id != "bkg_a"

    assert [due.booking_id for due in find_due(engine, 2, admit=admit)] == ["bkg_b", "bkg_c"]
    assert offered == ["bkg_a", "bkg_b", "bkg_c"]


def test_find_due_stops_after_max_rows(engine):
    for index in range(10):
        add_delivery(engine, f"bkg_{index}", -10 + index)
    offered: list[str] = []

    def reject(due: DueBooking) -> bool:
        offered.append(due.booking_id)
        return False

    assert find_due(engine, 5, admit=reject, max_rows=3) == []
    assert offered == ["bkg_0", "bkg_1", "bkg_2"]


def test_find_due_cursor_reaches_past_max_rows(engine):
    for index in range(10):
        add_delivery(engine, f"bkg_paced_{index}", -100 + index)
    add_delivery(engine, "bkg_other", -1)
    cursor = DueCursor()

    def admit(due: DueBooking) -> bool:
        return not due.booking_id.startswith("bkg_paced")

    searches = [[due.booking_id for due in find_due(engine, 5, admit=admit, max_rows=3, cursor=cursor)] for _ in range(3)]

    assert searches == [[], [], ["bkg_other"]]
    assert cursor.position is None
    assert find_due(engine, 5, admit=admit, max_rows=3) == []


def test_find_due_cursor_moves_one_page_per_search(engine):
    for index in range(10):
        add_delivery(engine, f"bkg_{index}", -100 + index)
    cursor = DueCursor()
    offered: list[str] = []

    def reject(due: DueBooking) -> bool:
        offered.append(due.booking_id)
        return False

    find_due(engine, 5, admit=reject, max_rows=3, cursor=cursor)
    first = list(offered)
    offered.clear()
    find_due(engine, 5, admit=reject, max_rows=3, cursor=cursor)

    assert first == ["bkg_0", "bkg_1", "bkg_2", "bkg_3", "bkg_4", "bkg_5"]
    assert offered == ["bkg_0", "bkg_1", "bkg_2", "bkg_6", "bkg_7", "bkg_8"]
    assert cursor.position is not None


def test_find_due_cursor_stays_when_first_page_fills(engine):
    for index in range(6):
        add_delivery(engine, f"bkg_{index}", -100 + index)
    cursor = DueCursor()
    find_due(engine, 5, admit=lambda due: False, max_rows=3, cursor=cursor)
    position = cursor.position

    found = find_due(engine, 2, max_rows=3, cursor=cursor)

    assert [due.booking_id for due in found] == ["bkg_0", "bkg_1"]
    assert cursor.position == position


def test_newest_pending_body_is_what_sync_applies(engine):
    add_delivery(engine, "bkg_a", -30, state=DeliveryState.APPLIED, body=b"applied", version="2026-03-16T16:00:00.000000Z")
    add_delivery(engine, "bkg_a", -5, body=b"newest", version="2026-03-16T15:00:00.000000Z")
    add_delivery(engine, "bkg_a", -10, body=b"older", version="2026-03-16T14:00:00.000000Z")
    add_delivery(engine, "bkg_a", -20, body=b"same time, lower rank", version="2026-03-16T15:00:00.000000Z", rank=-1)
    add_delivery(engine, "bkg_b", -10, state=DeliveryState.FAILED, body=b"failed")

    assert newest_pending_body(engine, "bkg_a") == b"newest"
    assert newest_pending_body(engine, "bkg_b") is None
    assert newest_pending_body(engine, "bkg_unknown") is None


def test_find_due_rejects_max_rows_below_one(engine):
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        find_due(engine, 5, max_rows=0)


def lease_owners(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(select(BookingLease.booking_id, BookingLease.owner)).all())


def test_acquire_leases_takes_free_and_expired(engine):
    assert acquire_leases(engine, ["bkg_live", "bkg_expired"], "worker-other", 60) == ["bkg_live", "bkg_expired"]
    with engine.begin() as connection:
        connection.execute(
            update(BookingLease).where(BookingLease.booking_id == "bkg_expired").values(expires_at=utcnow() - timedelta(seconds=1))
        )

    acquired = acquire_leases(engine, ["bkg_new", "bkg_live", "bkg_expired", "bkg_new"], "worker-me", 60)

    assert acquired == ["bkg_new", "bkg_expired"]
    assert lease_owners(engine) == {"bkg_live": "worker-other", "bkg_expired": "worker-me", "bkg_new": "worker-me"}


def test_acquire_leases_never_retakes_own_live_lease(engine):
    assert acquire_leases(engine, ["bkg_a"], "worker-me", 60) == ["bkg_a"]

    assert acquire_leases(engine, ["bkg_a"], "worker-me", 60) == []
    assert acquire_lease(engine, "bkg_a", "worker-me", 60) is False


def test_acquire_leases_empty_list(engine):
    assert acquire_leases(engine, [], "worker-me", 60) == []


def test_release_if_idle_keeps_lease_while_due(engine):
    add_delivery(engine, "bkg_due", -5)
    add_delivery(engine, "bkg_later", 60)
    acquire_leases(engine, ["bkg_due", "bkg_later", "bkg_none"], "worker-me", 60)

    with engine.begin() as connection:
        released = {booking: release_lease_if_idle(connection, booking, "worker-me") for booking in ("bkg_due", "bkg_later", "bkg_none")}

    assert released == {"bkg_due": False, "bkg_later": True, "bkg_none": True}
    assert lease_owners(engine) == {"bkg_due": "worker-me"}


def test_release_if_idle_leaves_other_owner(engine):
    acquire_leases(engine, ["bkg_a"], "worker-other", 60)

    with engine.begin() as connection:
        released = release_lease_if_idle(connection, "bkg_a", "worker-me")

    assert released is False
    assert lease_owners(engine) == {"bkg_a": "worker-other"}


def test_hand_back_lease_even_while_due(engine):
    add_delivery(engine, "bkg_due", -5)
    acquire_leases(engine, ["bkg_due", "bkg_other"], "worker-me", 60)
    acquire_leases(engine, ["bkg_theirs"], "worker-other", 60)

    with engine.begin() as connection:
        handed_back = {booking: hand_back_lease(connection, booking, "worker-me") for booking in ("bkg_due", "bkg_theirs")}

    assert handed_back == {"bkg_due": True, "bkg_theirs": False}
    assert lease_owners(engine) == {"bkg_other": "worker-me", "bkg_theirs": "worker-other"}
