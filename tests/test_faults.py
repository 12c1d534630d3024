"""One test per calendar failure: the connector against emulator faults, through the real google client.

Every test ends by checking the emulator's calendars: exactly one live event per active booking and
none for cancelled ones.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from connector.calendars.base import Target
from connector.calendars.google import GoogleCalendar
from connector.decisions import event_id_for
from connector.settings import Settings
from connector.storage import Delivery, utcnow
from connector.sync import DeliveryBackoff
from tests.calendar_state import assert_mirrored, live_events_by_booking, wait_settled, wait_until
from tests.support import booking, running_connector
from tests.support import connector_settings as connector_settings

JANE = "jane@example.com"
OMAR = "omar@example.com"
OMAR_HOST = {"hostEmail": OMAR, "hostUserId": "usr_omar", "hostName": "Omar Haddad"}


@pytest.fixture
def start_connector(tmp_path, emulator, service_account_key):
    """Return a function that starts a connector writing to the emulator, with settings overridden."""
    with ExitStack() as stack:
        def start(**overrides):
            settings = connector_settings(
                tmp_path,
                calendar_backend="google",
                google_credentials_file=service_account_key,
                google_api_endpoint=emulator.api_endpoint,
                **overrides,
            )
            return stack.enter_context(running_connector(settings))

        yield start


def calls(emulator, method: str | None = None, calendar_id: str | None = None) -> list:
    return [
        request for request in emulator.requests
        if (method is None or request.method == method) and (calendar_id is None or request.calendar_id == calendar_id)
    ]


def only_delivery(running) -> dict:
    rows = running.deliveries()
    assert len(rows) == 1, rows
    return rows[0]


def test_default_backoff_rides_out_an_hour():
    defaults = Settings.model_fields
    backoff = DeliveryBackoff(
        defaults["delivery_retry_base_seconds"].default,
        defaults["delivery_retry_max_seconds"].default,
        defaults["delivery_max_attempts"].default,
    )

    assert backoff.shortest_span() >= 3600


def test_backoff_doubles_to_cap_with_jitter():
    backoff = DeliveryBackoff(base_seconds=10, max_seconds=60, max_attempts=6)

    waits = [[backoff.delay(attempts) for _ in range(200)] for attempts in range(1, 6)]

    for attempts, ceiling in zip(range(1, 6), [10, 20, 40, 60, 60]):
        drawn = waits[attempts - 1]
        assert min(drawn) >= ceiling / 2
        assert max(drawn) <= ceiling
        assert len(set(drawn)) > 100
    assert backoff.delay(6) is None
    assert backoff.delay(1, retry_after=300) == 300


def test_transient_error_retried_within_call(start_connector, emulator):
    running = start_connector()
    emulator.add_fault("POST", status=503, times=1)

    running.deliver("booking.created", booking())
    wait_settled(running)

    delivery = only_delivery(running)
    assert delivery["state"] == "applied"
    assert delivery["attempts"] == 0
    assert [request.status for request in calls(emulator, "POST")] == [503, 200]
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_outage_retried_by_delivery_backoff(start_connector, emulator):
    running = start_connector()
    outage = emulator.add_fault(status=503, reason="backendError", message="Backend Error", times=None)

    running.deliver("booking.created", booking())
    wait_until(lambda: only_delivery(running)["attempts"] >= 3, 20, "three attempts failed")
    during = only_delivery(running)
    emulator.clear_faults()
    wait_settled(running)

    assert during["state"] == "pending"
    assert during["last_error"].startswith("booking bkg_xyz789: 503 backendError: events.")
    assert "Backend Error" in during["last_error"]
    assert outage.hits >= 6
    assert only_delivery(running)["state"] == "applied"
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_outage_of_one_host_leaves_others_flowing(start_connector, emulator):
    running = start_connector(worker_threads=2, delivery_retry_base_seconds=4.0, delivery_retry_max_seconds=4.0)
    emulator.add_fault(status=503, delay=0.5, times=None, calendar_id=JANE)
    jane_bookings = [f"bkg_jane_{number}" for number in range(6)]

    for booking_id in jane_bookings:
        running.deliver("booking.created", booking(id=booking_id))
    sent = time.monotonic()
    running.deliver("booking.created", booking(id="bkg_omar", **OMAR_HOST))
    wait_until(lambda: emulator.events(OMAR), 10, "omar's booking reached his calendar")
    omar_latency = time.monotonic() - sent
    jane_calls_meanwhile = len(calls(emulator, calendar_id=JANE))

    emulator.clear_faults()
    wait_settled(running, timeout=30)

    # The first two bookings probe the calendar, with two attempts each. The breaker then puts
    # the other four back without calling it, so omar's booking waits for one probe, not six.
    assert jane_calls_meanwhile <= 4
    assert omar_latency < 8.0
    assert_mirrored(emulator, [JANE, OMAR], active=[*jane_bookings, "bkg_omar"])


@pytest.mark.parametrize("attempts, gave_up", [(3, "(gave up after 3 attempts)"), (1, "(gave up after 1 attempt)")])
def test_last_attempt_marks_delivery_failed(start_connector, emulator, attempts, gave_up):
    running = start_connector(delivery_max_attempts=attempts)
    emulator.add_fault("POST", status=503, reason="backendError", message="Backend Error", times=None)

    running.deliver("booking.created", booking())
    wait_settled(running)

    delivery = only_delivery(running)
    assert delivery["state"] == "failed"
    assert delivery["attempts"] == attempts
    error = delivery["last_error"]
    assert error.startswith("booking bkg_xyz789: 503 backendError: events.insert of event")
    assert "Backend Error" in error
    assert f"(calendar {JANE})" in error
    assert error.endswith(gave_up)
    assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])


@pytest.mark.parametrize(
    ("fault", "calls_made", "expected"),
    [
        ({"status": 400, "reason": "invalid", "message": "Invalid start time."}, 1, "400 invalid: events.insert"),
        ({"status": 401, "reason": "authError", "message": "Invalid Credentials"}, 2, "401 authError: events.insert"),
        ({"status": 403, "reason": "forbidden", "message": "Forbidden"}, 1, "403 forbidden: events.insert"),
        ({"status": 403, "reason": "forbiddenForServiceAccounts", "message": "Service accounts cannot invite"},
         1, "403 forbiddenForServiceAccounts"),
    ],
    ids=["400", "401-after-refresh", "403-forbidden", "403-service-account"],
)
def test_permanent_error_fails_at_once(start_connector, emulator, fault, calls_made, expected):
    running = start_connector()
    emulator.add_fault("POST", times=None, **fault)

    running.deliver("booking.created", booking())
    wait_settled(running)
    time.sleep(0.3)

    delivery = only_delivery(running)
    assert delivery["state"] == "failed"
    assert delivery["attempts"] == 1
    assert delivery["last_error"].startswith(f"booking bkg_xyz789: {expected}")
    assert fault["message"] in delivery["last_error"]
    assert f"(calendar {JANE})" in delivery["last_error"]
    assert len(calls(emulator)) == calls_made
    # The refused insert stored nothing, so the mapping names no event either.
    assert running.mapping("bkg_xyz789") is None
    assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])


def test_missing_calendar_fails_at_once(start_connector, emulator):
    running = start_connector()
    emulator.auto_user_calendars = False

    running.deliver("booking.created", booking())
    wait_settled(running)

    delivery = only_delivery(running)
    assert delivery["state"] == "failed"
    assert delivery["attempts"] == 1
    assert delivery["last_error"].startswith("booking bkg_xyz789: 404 notFound: events.insert")
    assert "the calendar was not found, or is not shared with jane@example.com" in delivery["last_error"]
    assert len(calls(emulator)) == 1
    assert emulator.events(JANE) == []


def test_host_without_route_fails_at_once(start_connector, emulator):
    running = start_connector()

    running.deliver("booking.created", booking(hostEmail=None, hostUserId="usr_nomail", hostName="No Mail"))
    wait_settled(running)

    delivery = only_delivery(running)
    assert delivery["state"] == "failed"
    assert delivery["attempts"] == 1
    assert "booking bkg_xyz789: Host usr_nomail (No Mail) has no email address and no rule" in delivery["last_error"]
    assert emulator.requests == []


@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "rateLimitExceeded"), (403, "rateLimitExceeded"), (403, "userRateLimitExceeded")],
)
def test_rate_limit_waits_retry_after_and_never_fails(start_connector, emulator, status, reason):
    # One attempt allowed: a rate limit that counted as a failed attempt would fail the delivery.
    running = start_connector(delivery_max_attempts=1)
    emulator.add_fault("POST", status=status, reason=reason, retry_after=1, times=3)

    started = time.monotonic()
    running.deliver("booking.created", booking())
    wait_settled(running)
    elapsed = time.monotonic() - started

    delivery = only_delivery(running)
    assert delivery["state"] == "applied"
    assert delivery["attempts"] == 0
    assert [request.status for request in calls(emulator, "POST")] == [status, status, status, 200]
    # Three waits of Retry-After: 1 s each.
    assert elapsed >= 2.9
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_quota_exceeded_waits_long(start_connector, emulator):
    running = start_connector()
    emulator.add_fault("POST", status=403, reason="quotaExceeded", message="Calendar usage limits exceeded.",
                       times=None, calendar_id=JANE)

    running.deliver("booking.created", booking(id="bkg_first"))
    wait_until(lambda: running.due_count() == 0 and running.connector.worker.in_flight() == 0, 10, "the worker is idle")
    running.deliver("booking.created", booking(id="bkg_second"))
    running.deliver("booking.created", booking(id="bkg_omar", **OMAR_HOST))
    wait_until(lambda: running.due_count() == 0 and running.connector.worker.in_flight() == 0, 10, "the worker is idle")
    time.sleep(0.5)

    rows = {row["booking_id"]: row for row in running.deliveries()}
    next_attempts = {row.booking_id: row.next_attempt_at for row in _delivery_rows(running)}
    # The first insert learns the quota is used up; the second booking is put back without a call.
    assert len(calls(emulator, "POST", JANE)) == 1
    for booking_id in ("bkg_first", "bkg_second"):
        assert rows[booking_id]["state"] == "pending"
        assert rows[booking_id]["attempts"] == 0
        assert "quota" in rows[booking_id]["last_error"]
        assert next_attempts[booking_id] > utcnow() + timedelta(minutes=25)
    assert rows["bkg_omar"]["state"] == "applied"
    assert_mirrored(emulator, [JANE, OMAR], active=["bkg_omar"], removed=["bkg_first", "bkg_second"])


def _delivery_rows(running) -> list[Delivery]:
    with Session(running.connector.engine) as session:
        return list(session.exec(select(Delivery)).all())


def test_insert_response_lost_creates_one_event(start_connector, emulator):
    running = start_connector()
    emulator.add_fault("POST", status=503, after_commit=True, times=1)

    running.deliver("booking.created", booking())
    wait_settled(running)

    assert [request.status for request in calls(emulator, "POST")] == [503, 409]
    assert only_delivery(running)["state"] == "applied"
    assert [event["id"] for event in emulator.events(JANE)] == [event_id_for("bkg_xyz789", 0)]
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_insert_timeout_after_commit_creates_one_event(start_connector, emulator):
    running = start_connector(call_timeout_seconds=0.5)
    emulator.add_fault("POST", status=None, after_commit=True, delay=1.5, times=1)

    running.deliver("booking.created", booking())
    wait_settled(running)

    assert only_delivery(running)["state"] == "applied"
    assert [request.status for request in calls(emulator, "POST")][-1] == 409
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_lost_responses_every_attempt_create_one_event(start_connector, emulator):
    # Each in-call attempt and each delivery attempt loses its response, for a while.
    running = start_connector()
    emulator.add_fault(status=503, after_commit=True, times=5)

    running.deliver("booking.created", booking())
    wait_settled(running)

    assert only_delivery(running)["state"] == "applied"
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
def test_change_response_lost_is_applied_once(start_connector, emulator, method):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.add_fault(method, status=503, after_commit=True, times=1)

    if method == "DELETE":
        running.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:10:00Z")
    else:
        running.deliver("booking.rescheduled", booking(startTime="2026-03-17T09:00:00Z", endTime="2026-03-17T09:30:00Z"),
                        "2026-03-16T14:10:00Z")
    wait_settled(running)

    assert [row["state"] for row in running.deliveries()] == ["applied", "applied"]
    if method == "DELETE":
        assert [request.status for request in calls(emulator, "DELETE")] == [503, 410]
        assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])
    else:
        assert emulator.events(JANE)[0]["start"]["dateTime"] == "2026-03-17T09:00:00Z"
        assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_move_insert_response_lost_moves_once(start_connector, emulator):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.add_fault("POST", status=503, after_commit=True, times=1, calendar_id=OMAR)

    running.deliver("booking.rescheduled", booking(**OMAR_HOST), "2026-03-16T15:00:00Z")
    wait_settled(running)

    assert_mirrored(emulator, [JANE, OMAR], active=["bkg_xyz789"])
    assert len(emulator.events(OMAR)) == 1


def test_host_deleted_event_recreated_without_loop(start_connector, emulator):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.delete_event_directly(JANE, event_id_for("bkg_xyz789", 0))
    before = len(emulator.requests)

    running.deliver("booking.rescheduled", booking(startTime="2026-03-16T15:00:00Z", endTime="2026-03-16T15:30:00Z"),
                    "2026-03-16T14:30:00Z")
    wait_settled(running)
    time.sleep(0.3)

    # patch (refused: deleted), get (cancelled), insert of the next generation
    assert [(request.method, request.status) for request in emulator.requests[before:]] == [
        ("PATCH", 403), ("GET", 200), ("POST", 200)
    ]
    events = emulator.events(JANE)
    assert [event["id"] for event in events] == [event_id_for("bkg_xyz789", 1)]
    assert events[0]["start"]["dateTime"] == "2026-03-16T15:00:00Z"
    assert running.mapping("bkg_xyz789")["generation"] == 1
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_host_deleted_event_then_cancel_ends_quietly(start_connector, emulator):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.delete_event_directly(JANE, event_id_for("bkg_xyz789", 0))

    running.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:30:00Z")
    wait_settled(running)

    assert [row["state"] for row in running.deliveries()] == ["applied", "applied"]
    assert [request.status for request in calls(emulator, "DELETE")] == [410]
    assert running.mapping("bkg_xyz789")["state"] == "deleted"
    assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])


def test_host_moved_time_kept_on_unrelated_change(start_connector, emulator):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    event_id = event_id_for("bkg_xyz789", 0)
    emulator.patch_event_directly(JANE, event_id, {"start": {"dateTime": "2026-03-16T16:00:00Z"},
                                                   "end": {"dateTime": "2026-03-16T16:30:00Z"}})

    notes_changed = booking(invitee={**booking()["invitee"], "notes": "Bring the contract"})
    running.deliver("booking.rescheduled", notes_changed, "2026-03-16T14:30:00Z")
    wait_settled(running)

    events = emulator.events(JANE)
    assert [event["id"] for event in events] == [event_id]
    assert events[0]["start"]["dateTime"] == "2026-03-16T16:00:00Z"
    assert "Bring the contract" in events[0]["description"]
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_host_moved_event_to_other_calendar_is_recreated(start_connector, emulator, service_account_key):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.add_calendar("jane-private@example.com", owner=JANE)
    with GoogleCalendar(service_account_key, emulator.api_endpoint) as host:
        host.move_event(Target(JANE, JANE), event_id_for("bkg_xyz789", 0), "jane-private@example.com")

    running.deliver("booking.rescheduled", booking(startTime="2026-03-16T15:00:00Z", endTime="2026-03-16T15:30:00Z"),
                    "2026-03-16T14:30:00Z")
    wait_settled(running)

    assert [row["state"] for row in running.deliveries()] == ["applied", "applied"]
    assert [event["id"] for event in emulator.events(JANE)] == [event_id_for("bkg_xyz789", 1)]
    # The copy the host moved stays where the host put it; the connector does not manage that calendar.
    assert len(live_events_by_booking(emulator, ["jane-private@example.com"])["bkg_xyz789"]) == 1
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_create_and_cancel_during_outage_leave_nothing(start_connector, emulator):
    running = start_connector()
    emulator.add_fault(status=503, times=None)

    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_until(lambda: only_delivery(running)["attempts"] >= 1, 10, "the first attempt failed")
    running.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:10:00Z")
    time.sleep(0.3)
    emulator.clear_faults()
    wait_settled(running)

    assert sorted(row["state"] for row in running.deliveries()) == ["applied", "stale"]
    assert emulator.events(JANE, include_deleted=True) == []


def test_lost_insert_before_new_id_reschedule(start_connector, emulator):
    running = start_connector(delivery_retry_base_seconds=1.0, delivery_retry_max_seconds=1.0)
    emulator.add_fault("POST", status=503, after_commit=True, times=2, calendar_id=JANE)
    running.deliver("booking.created", booking(id="bkg_old"), "2026-03-16T14:05:00Z")
    wait_until(lambda: running.deliveries("bkg_old")[0]["attempts"] == 1, 10, "the insert's responses were lost")

    # Omar's calendar is not paused by the failures in Jane's, so only the mapping can tell the
    # new booking that the old one's event may exist.
    successor = booking(id="bkg_new", rescheduledFrom="bkg_old", startTime="2026-03-20T08:00:00Z",
                        endTime="2026-03-20T08:30:00Z", **OMAR_HOST)
    running.deliver("booking.rescheduled", successor, "2026-03-16T15:00:00Z")
    wait_settled(running)

    events = emulator.events(OMAR)
    assert emulator.events(JANE) == []
    assert len(events) == 1
    assert events[0]["start"]["dateTime"] == "2026-03-20T08:00:00Z"
    assert running.mapping("bkg_old")["state"] == "carried_over"
    assert_mirrored(emulator, [JANE, OMAR], active=["bkg_new"], removed=["bkg_old"])


def test_lost_move_insert_before_cancel(start_connector, emulator):
    running = start_connector(delivery_retry_base_seconds=1.0, delivery_retry_max_seconds=1.0)
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    emulator.add_fault("POST", status=503, after_commit=True, times=2, calendar_id=OMAR)
    running.deliver("booking.rescheduled", booking(**OMAR_HOST), "2026-03-16T15:00:00Z")
    wait_until(lambda: running.deliveries()[-1]["attempts"] == 1, 10, "the move's insert responses were lost")

    running.deliver("booking.cancelled", booking(status="Cancelled", **OMAR_HOST), "2026-03-16T16:00:00Z")
    wait_settled(running)

    assert emulator.events(JANE) == []
    assert emulator.events(OMAR) == []
    assert running.mapping("bkg_xyz789")["state"] == "deleted"


def test_refused_recreate_keeps_deleted_mapping(start_connector, emulator):
    running = start_connector()
    running.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    wait_settled(running)
    running.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:10:00Z")
    wait_settled(running)
    deleted = running.mapping("bkg_xyz789")
    emulator.add_fault("POST", status=403, reason="forbidden", times=1)

    running.deliver("booking.rescheduled", booking(), "2026-03-16T14:20:00Z")
    wait_settled(running)

    assert running.deliveries()[-1]["state"] == "failed"
    assert running.mapping("bkg_xyz789") == deleted
    assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])
