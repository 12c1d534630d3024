"""`find_due_bookings`: which bookings the dispatcher takes next, and in what order."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from connector.queue import acquire_lease, find_due_bookings
from connector.storage import Delivery, DeliveryState, create_tables, make_engine, utcnow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'due.db'}", pool_size=2)
    create_tables(engine)
    yield engine
    engine.dispose()


def add_delivery(engine: Engine, booking_id: str | None, due_in: float, state: str = DeliveryState.PENDING) -> None:
    now = utcnow()
    add_delivery.count += 1
    with engine.begin() as connection:
        connection.execute(insert(Delivery).values(
            delivery_id=f"dlv_{add_delivery.count}",
            body_digest=f"{add_delivery.count:064d}",
            event="booking.created",
            version="2026-03-16T14:05:00.000000Z",
            rank=0,
            booking_id=booking_id,
            body=b"{}",
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
