"""Checks shared by the fault, crash and property tests: what the emulator's calendars hold, and waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from connector.calendars.base import BOOKING_ID_PROPERTY
from connector.storage import Delivery, DeliveryState


def live_events_by_booking(emulator, calendar_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Group the live events of the calendars by the booking id they carry."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for calendar_id in calendar_ids:
        for event in emulator.events(calendar_id):
            booking_id = event.get("extendedProperties", {}).get("private", {}).get(BOOKING_ID_PROPERTY)
            grouped.setdefault(booking_id, []).append(event)
    return grouped


def assert_mirrored(emulator, calendar_ids: Iterable[str], active: Iterable[str], removed: Iterable[str] = ()) -> None:
    """Assert exactly one live event per active booking, none for removed ones, and no other."""
    grouped = live_events_by_booking(emulator, calendar_ids)
    for booking_id in active:
        assert len(grouped.get(booking_id, [])) == 1, f"booking {booking_id}: {grouped.get(booking_id)}"
    for booking_id in removed:
        assert grouped.get(booking_id, []) == [], f"booking {booking_id} was removed: {grouped[booking_id]}"
    assert set(grouped) <= set(active), f"events of unexpected bookings: {set(grouped) - set(active)}"


def pending_count(engine: Engine) -> int:
    """Return how many deliveries are pending, due or waiting for a retry."""
    with engine.begin() as connection:
        return connection.execute(
            select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.PENDING)
        ).scalar_one()


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


def wait_settled(running, timeout: float = 30.0) -> None:
    """Wait until no delivery is pending (retries included) and the worker has nothing in flight."""
    engine = running.connector.engine
    worker = running.connector.worker
    wait_until(
        lambda: pending_count(engine) == 0 and worker.in_flight() == 0,
        timeout,
        f"every delivery was finished: {running.deliveries()}",
    )
