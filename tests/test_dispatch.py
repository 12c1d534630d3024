"""Dispatching under per-user pacing: a paced host's bookings wait in the queue, not in a thread."""

from __future__ import annotations

import time

import pytest

from connector import worker as worker_module
from connector.routing import Router
from tests.support import booking, running_connector

ANA = "ana@example.com"
BEN = "ben@example.com"


def moved(payload: dict, start: str, end: str) -> dict:
    return dict(payload, startTime=start, endTime=end)


def two_threads_paced(google_settings):
    """Return settings with two sync threads and each host's calls 0.1 s apart."""
    return google_settings.model_copy(update={"worker_threads": 2, "google_user_requests_per_minute": 600})


def twelve_of_ana_then_ben() -> tuple[list[dict], dict]:
    ana_bookings = [booking(id=f"bkg_ana_{index}", hostEmail=ANA, hostUserId="usr_ana") for index in range(12)]
    return ana_bookings, booking(id="bkg_ben", hostEmail=BEN, hostUserId="usr_ben")


def create_all(running, payloads: list[dict]) -> None:
    for payload in payloads:
        running.deliver("booking.created", payload, "2026-03-16T14:05:00Z")


def test_paced_host_waits_in_queue_not_in_thread(google_settings, emulator):
    # One thread, and 120 requests per minute per host, so each host's calls are 0.5 s apart.
    settings = google_settings.model_copy(update={"worker_threads": 1, "google_user_requests_per_minute": 120})
    ana_booking = booking(id="bkg_ana", hostEmail=ANA, hostUserId="usr_ana")
    ben_booking = booking(id="bkg_ben", hostEmail=BEN, hostUserId="usr_ben")

    with running_connector(settings) as running:
        running.deliver("booking.created", ana_booking, "2026-03-16T14:05:00Z")
        running.deliver("booking.created", ben_booking, "2026-03-16T14:05:00Z")
        running.wait_idle()
        time.sleep(0.6)  # both hosts' next pacing slots are free again
        emulator.latency = 0.3
        requests_before = len(emulator.requests)

        # Ana's second change is stored while her first one's call is in flight, and Ben's after it.
        running.deliver("booking.rescheduled", moved(ana_booking, "2026-03-17T09:00:00Z", "2026-03-17T09:30:00Z"), "2026-03-16T15:00:00Z")
        time.sleep(0.1)
        running.deliver("booking.rescheduled", moved(ana_booking, "2026-03-18T09:00:00Z", "2026-03-18T09:30:00Z"), "2026-03-16T16:00:00Z")
        running.deliver("booking.rescheduled", moved(ben_booking, "2026-03-17T10:00:00Z", "2026-03-17T10:30:00Z"), "2026-03-16T15:30:00Z")
        running.wait_idle()

    patches = [(request.calendar_id, request.body["start"]["dateTime"]) for request in emulator.requests[requests_before:]]
    # Without the queueing, the thread would sleep 0.5 s for Ana's slot while Ben's change waited.
    assert patches == [
        (ANA, "2026-03-17T09:00:00Z"),
        (BEN, "2026-03-17T10:00:00Z"),
        (ANA, "2026-03-18T09:00:00Z"),
    ]
    assert [delivery["state"] for delivery in running.deliveries("bkg_ana")] == ["applied", "applied", "applied"]


def test_host_behind_paced_backlog_is_reached(google_settings, emulator, monkeypatch):
    # Ana's 12 changes fill more than the 4 rows a search reads first, and her calls are 0.1 s
    # apart. Ben's change, due after all of hers, must not wait until her backlog drains.
    monkeypatch.setattr(worker_module, "MAX_ROWS_PER_DISPATCH", 4)
    ana_bookings, ben_booking = twelve_of_ana_then_ben()

    with running_connector(two_threads_paced(google_settings)) as running:
        create_all(running, [*ana_bookings, ben_booking])
        running.wait_idle()
        time.sleep(0.2)  # both hosts' next pacing slots are free again
        requests_before = len(emulator.requests)

        for payload in ana_bookings:
            running.deliver("booking.rescheduled", moved(payload, "2026-03-17T09:00:00Z", "2026-03-17T09:30:00Z"), "2026-03-16T15:00:00Z")
        running.deliver("booking.rescheduled", moved(ben_booking, "2026-03-17T10:00:00Z", "2026-03-17T10:30:00Z"), "2026-03-16T15:00:00Z")
        running.wait_idle()

    patched = [request.calendar_id for request in emulator.requests[requests_before:]]
    assert sorted(patched) == [ANA] * 12 + [BEN]
    # Without the search's cursor, Ben's change waited behind eight of hers.
    assert patched.index(BEN) <= 4


@pytest.mark.parametrize("routes_per_search", [worker_module.MAX_ROUTES_PER_DISPATCH, 2])
def test_new_bookings_of_paced_host_wait_in_queue(google_settings, emulator, monkeypatch, routes_per_search):
    # Twelve new bookings of Ana, whose calls are 0.1 s apart, then one of Ben. None has a mapping
    # yet, so the dispatcher learns each host from the booking's routing, a few per search.
    monkeypatch.setattr(worker_module, "MAX_ROUTES_PER_DISPATCH", routes_per_search)
    ana_bookings, ben_booking = twelve_of_ana_then_ben()

    with running_connector(two_threads_paced(google_settings)) as running:
        create_all(running, [*ana_bookings, ben_booking])
        running.wait_idle()

    inserted = [request.calendar_id for request in emulator.requests if request.method == "POST"]
    assert sorted(inserted) == [ANA] * 12 + [BEN]
    # Without the routing hint, both threads took Ana's bookings in due order and Ben's came last.
    assert inserted.index(BEN) <= 3


def test_routing_error_spares_other_bookings(google_settings, emulator, monkeypatch):
    route = Router.route

    def route_failing_for_one(router, payload):
        if payload.get("id") == "bkg_broken":
            raise RuntimeError("routing rule evaluation failed")
        return route(router, payload)

    monkeypatch.setattr(Router, "route", route_failing_for_one)
    settings = google_settings.model_copy(update={"worker_threads": 2})

    with running_connector(settings) as running:
        running.deliver("booking.created", booking(id="bkg_broken", hostEmail=ANA), "2026-03-16T14:05:00Z")
        running.deliver("booking.created", booking(id="bkg_fine", hostEmail=BEN), "2026-03-16T14:05:00Z")
        running.wait_idle()
        broken = running.deliveries("bkg_broken")
        fine = running.deliveries("bkg_fine")

    assert [request.calendar_id for request in emulator.requests if request.method == "POST"] == [BEN]
    assert [delivery["state"] for delivery in fine] == ["applied"]
    assert broken[0]["state"] == "pending"
    assert "routing rule evaluation failed" in broken[0]["last_error"]
