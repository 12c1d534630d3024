"""Signed deliveries in, calendar events out.

Tests taking the `mirror` fixture run twice: against the Google Calendar emulator through the real
Google client, and against the embedded iCalendar backend. Tests about Google's wire calls take
`google_connector` and `emulator` directly.
"""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import event, select
from starlette.testclient import TestClient

from connector.decisions import event_id_for
from connector.storage import SQLITE_READ_ONLY_OPTION, BookingLease
from tests.support import SECRET, booking, signed_delivery

JANE = "jane@example.com"
OMAR = "omar@example.com"


def live_events(emulator, calendar_id: str = JANE) -> list[dict]:
    return emulator.events(calendar_id)


def writes(emulator) -> list:
    return [request for request in emulator.requests if request.method != "GET"]


def test_sample_booking_becomes_event(mirror):
    response = mirror.deliver("booking.created", booking())
    mirror.wait_idle()

    assert response.status_code == 200
    assert response.json()["status"] == "accepted"
    events = mirror.events(JANE)
    assert len(events) == 1
    event = events[0]
    assert event["id"] == event_id_for("bkg_xyz789", 0)
    assert event["summary"] == "30 Minute Call with Alex Johnson"
    assert event["status"] == "confirmed"
    assert event["location"] == "https://meet.google.com/abc-defg-hij"
    assert event["start"]["dateTime"] == "2026-03-16T14:00:00Z"
    assert event["end"]["dateTime"] == "2026-03-16T14:30:00Z"
    assert event["extendedProperties"]["private"]["proximityBookingId"] == "bkg_xyz789"
    for expected in ("alex@example.com", "+1-555-0123", "America/New_York", "Looking forward to it",
                     "Acme Inc.", "Engineering Manager", "https://meet.google.com/abc-defg-hij"):
        assert expected in event["description"]


def test_writes_send_no_updates_and_charge_host(google_connector, emulator):
    google_connector.deliver("booking.created", booking())
    google_connector.wait_idle()

    inserts = [request for request in emulator.requests if request.method == "POST"]
    assert len(inserts) == 1
    assert inserts[0].query.get("sendUpdates") == "none"
    assert inserts[0].query.get("quotaUser") == JANE
    assert inserts[0].user == JANE


def test_pending_booking_is_tentative(mirror):
    mirror.deliver("booking.created", booking(status="PendingApproval"))
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["status"] == "tentative"


def test_approval_confirms_tentative_event(mirror):
    mirror.deliver("booking.created", booking(status="PendingApproval"), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.approved", booking(status="Confirmed"), "2026-03-16T14:06:00Z")
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["status"] == "confirmed"
    assert not events[0]["summary"].startswith("Pending")


@pytest.mark.parametrize("event", ["booking.declined", "booking.cancelled"])
def test_removing_event_deletes_calendar_event(mirror, event):
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    mirror.deliver(event, booking(status="Cancelled"), "2026-03-16T14:07:00Z")
    mirror.wait_idle()

    assert mirror.events(JANE) == []
    deleted = mirror.events(JANE, include_deleted=True)
    assert len(deleted) == 1
    assert deleted[0]["status"] == "cancelled"
    assert mirror.mapping("bkg_xyz789")["state"] == "deleted"


@pytest.mark.parametrize(
    ("event", "prefix"), [("booking.noShow", "No-show: "), ("booking.completed", "Completed: ")]
)
def test_marker_events_keep_event_and_say_so(mirror, event, prefix):
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    mirror.deliver(event, booking(), "2026-03-16T15:00:00Z")
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["summary"] == prefix + "30 Minute Call with Alex Johnson"


def test_reschedule_same_id_moves_time_with_one_patch(google_connector, emulator):
    google_connector.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    google_connector.wait_idle()
    requests_before = len(emulator.requests)

    moved = booking(startTime="2026-03-17T09:00:00Z", endTime="2026-03-17T09:30:00Z")
    google_connector.deliver("booking.rescheduled", moved, "2026-03-16T16:00:00Z")
    google_connector.wait_idle()

    new_requests = emulator.requests[requests_before:]
    assert [request.method for request in new_requests] == ["PATCH"]
    events = live_events(emulator)
    assert len(events) == 1
    assert events[0]["start"]["dateTime"] == "2026-03-17T09:00:00Z"
    assert events[0]["end"]["dateTime"] == "2026-03-17T09:30:00Z"


def test_reschedule_costs_two_write_transactions(google_connector, emulator):
    engine = google_connector.connector.engine
    if engine.dialect.name != "sqlite":
        pytest.skip("only SQLite tells write transactions from reads: they start with BEGIN IMMEDIATE")
    google_connector.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    google_connector.wait_idle()

    write_threads: list[str] = []

    def count_write(connection) -> None:
        # Only the worker's threads (the dispatcher and the sync pool) count, not the test's polling.
        thread_name = threading.current_thread().name
        if thread_name.startswith("sync") and not connection.get_execution_options().get(SQLITE_READ_ONLY_OPTION):
            write_threads.append(thread_name)

    event.listen(engine, "begin", count_write)
    try:
        moved = booking(startTime="2026-03-17T09:00:00Z", endTime="2026-03-17T09:30:00Z")
        google_connector.deliver("booking.rescheduled", moved, "2026-03-16T16:00:00Z")
        google_connector.wait_idle()
    finally:
        event.remove(engine, "begin", count_write)

    # One to take the lease, and one to record the outcome and give the lease back.
    assert len(write_threads) == 2
    with engine.connect() as connection:
        assert connection.execute(select(BookingLease.booking_id)).all() == []
    assert live_events(emulator)[0]["start"]["dateTime"] == "2026-03-17T09:00:00Z"


def test_duplicate_delivery_id_stores_nothing_new(google_connector, emulator):
    delivery = signed_delivery("booking.created", booking(), delivery_id="dlv_same")
    first = google_connector.send(delivery)
    second = google_connector.send(delivery)
    google_connector.wait_idle()

    assert first.json()["status"] == "accepted"
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert len(google_connector.deliveries()) == 1
    assert len(writes(emulator)) == 1


def test_same_body_new_delivery_id_is_duplicate(google_connector, emulator):
    delivery = signed_delivery("booking.created", booking(), delivery_id="dlv_a")
    retry = type(delivery)(delivery.body, {**delivery.headers, "X-Webhook-Delivery": "dlv_b"})
    google_connector.send(delivery)
    response = google_connector.send(retry)
    google_connector.wait_idle()

    assert response.json()["status"] == "duplicate"
    assert [row["delivery_id"] for row in google_connector.deliveries()] == ["dlv_a"]


def test_repeat_after_apply_costs_no_call(google_connector, emulator):
    google_connector.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    google_connector.wait_idle()
    requests_before = len(emulator.requests)

    stale = booking(notes="reordered copy")
    google_connector.deliver("booking.created", stale, "2026-03-16T14:05:00Z")
    google_connector.wait_idle()

    assert len(emulator.requests) == requests_before
    assert google_connector.deliveries()[-1]["state"] == "stale"


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"X-Webhook-Signature": "0" * 64}, 401),
        ({"X-Webhook-Signature": ""}, 401),
        ({"X-Webhook-Event": "booking.cancelled"}, 400),
        ({"X-Webhook-Delivery": ""}, 400),
        ({"X-Webhook-Delivery": "d" * 201}, 400),
    ],
)
def test_refused_delivery_changes_nothing(google_connector, emulator, change, status):
    delivery = signed_delivery("booking.created", booking())
    response = google_connector.send(delivery, change)
    google_connector.wait_idle()

    assert response.status_code == status
    assert google_connector.deliveries() == []
    assert emulator.requests == []


@pytest.mark.parametrize(
    ("delivery_id", "logged"),
    [
        ("", "delivery - rejected: missing X-Webhook-Delivery header"),
        ("d" * 201, "delivery '" + "d" * 80 + "' rejected: X-Webhook-Delivery is not printable text"),
    ],
)
def test_refused_delivery_id_is_logged(google_connector, caplog, delivery_id, logged):
    caplog.set_level(logging.WARNING, logger="connector.receiver")

    response = google_connector.send(signed_delivery("booking.created", booking()), {"X-Webhook-Delivery": delivery_id})

    assert response.status_code == 400
    messages = [record.getMessage() for record in caplog.records if record.name == "connector.receiver"]
    assert len(messages) == 1
    assert messages[0].startswith(logged)


def test_wrong_secret_rejected(google_connector, emulator):
    response = google_connector.send(signed_delivery("booking.created", booking(), secret="not-" + SECRET))

    assert response.status_code == 401
    assert google_connector.deliveries() == []


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"event": "booking.created"}'])
def test_malformed_body_rejected(google_connector, body):
    import hashlib
    import hmac

    headers = {
        "X-Webhook-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-Webhook-Event": "booking.created",
        "X-Webhook-Delivery": "dlv_bad",
    }
    response = google_connector.client.post("/webhooks/proximity", content=body, headers=headers)

    assert response.status_code == 400
    assert response.json()["error"]
    assert google_connector.deliveries() == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "body is empty"),
        (
            b'{"event": "booking.created", "createdAt": "2026-03-16T14:05:00Z", "payload": {"id": 5}}',
            "booking.created payload id must be a string, not a number",
        ),
    ],
)
def test_malformed_body_reason_answered(google_connector, body, error):
    import hashlib
    import hmac

    headers = {
        "X-Webhook-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-Webhook-Delivery": "dlv_bad",
    }
    response = google_connector.client.post("/webhooks/proximity", content=body, headers=headers)

    assert response.status_code == 400
    assert error in response.json()["error"]
    assert google_connector.deliveries() == []


def test_oversized_body_rejected(google_connector, emulator):
    huge = booking(invitee={"name": "x" * (1024 * 1024 + 10)})
    response = google_connector.deliver("booking.created", huge)

    assert response.status_code == 413
    assert google_connector.deliveries() == []


def test_unknown_event_type_stored_as_ignored(google_connector, emulator):
    response = google_connector.deliver("booking.paymentReceived", booking())
    google_connector.wait_idle()

    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert [row["state"] for row in google_connector.deliveries()] == ["ignored"]
    assert emulator.requests == []


def test_headers_are_case_insensitive(google_connector, emulator):
    delivery = signed_delivery("booking.created", booking())
    lowered = {name.lower(): value for name, value in delivery.headers.items()}
    response = google_connector.client.post("/webhooks/proximity", content=delivery.body, headers=lowered)
    google_connector.wait_idle()

    assert response.status_code == 200
    assert len(live_events(emulator)) == 1


def test_webhook_path_other_methods_get_405(ics_connector):
    for method in ("GET", "PUT", "DELETE"):
        response = ics_connector.client.request(method, "/webhooks/proximity")

        assert response.status_code == 405, method
        assert response.headers["allow"] == "POST"
    assert ics_connector.deliveries() == []


def test_webhook_under_root_path_is_received(ics_connector):
    # Behind a proxy that mounts the connector under /proxy, Starlette's router strips the root path.
    proxied = TestClient(ics_connector.client.app, root_path="/proxy")
    delivery = signed_delivery("booking.created", booking())
    response = proxied.post("/proxy/webhooks/proximity", content=delivery.body, headers=delivery.headers)

    assert response.status_code == 200
    assert response.json()["status"] == "accepted"
    assert [row["delivery_id"] for row in ics_connector.deliveries()] == [delivery.delivery_id]


def test_late_older_snapshot_changes_nothing(mirror):
    moved = booking(startTime="2026-03-18T10:00:00Z", endTime="2026-03-18T10:30:00Z")
    mirror.deliver("booking.rescheduled", moved, "2026-03-16T16:00:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["start"]["dateTime"] == "2026-03-18T10:00:00Z"


def test_cancel_overtaking_create_leaves_no_event(mirror):
    mirror.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:10:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()

    assert mirror.events(JANE, include_deleted=True) == []
    assert [row["state"] for row in mirror.deliveries()] == ["applied", "stale"]


def test_cancel_wins_tie_with_create(mirror):
    mirror.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()

    assert mirror.events(JANE) == []


def test_new_id_reschedule_takes_over_event(mirror):
    mirror.deliver("booking.created", booking(id="bkg_old"), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    original_id = mirror.events(JANE)[0]["id"]

    successor = booking(id="bkg_new", rescheduledFrom="bkg_old",
                        startTime="2026-03-20T08:00:00Z", endTime="2026-03-20T08:30:00Z")
    mirror.deliver("booking.rescheduled", successor, "2026-03-16T15:00:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.cancelled", booking(id="bkg_old", status="Cancelled"), "2026-03-16T15:00:01Z")
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["id"] == original_id
    assert events[0]["start"]["dateTime"] == "2026-03-20T08:00:00Z"
    assert events[0]["extendedProperties"]["private"]["proximityBookingId"] == "bkg_new"
    assert mirror.mapping("bkg_new")["event_id"] == original_id
    assert mirror.mapping("bkg_old")["state"] == "carried_over"


def test_reschedule_before_original_creates_one_event(mirror):
    successor = booking(id="bkg_new", rescheduledFrom="bkg_old",
                        startTime="2026-03-20T08:00:00Z", endTime="2026-03-20T08:30:00Z")
    mirror.deliver("booking.created", successor, "2026-03-16T15:00:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.created", booking(id="bkg_old"), "2026-03-16T14:05:00Z")
    mirror.wait_idle()

    events = mirror.events(JANE)
    assert len(events) == 1
    assert events[0]["extendedProperties"]["private"]["proximityBookingId"] == "bkg_new"


def test_host_change_moves_event(mirror):
    mirror.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    mirror.wait_idle()
    reassigned = booking(hostEmail=OMAR, hostUserId="usr_omar", hostName="Omar Haddad")
    mirror.deliver("booking.rescheduled", reassigned, "2026-03-16T15:00:00Z")
    mirror.wait_idle()

    assert mirror.events(JANE) == []
    moved = mirror.events(OMAR)
    assert len(moved) == 1
    assert moved[0]["extendedProperties"]["private"]["proximityBookingId"] == "bkg_xyz789"
    assert mirror.mapping("bkg_xyz789")["calendar_id"] == OMAR


def test_non_ascii_and_emoji_survive(mirror):
    payload = booking(eventTypeName="Café ☕ consult", invitee={"name": "Zoë Ångström 🎉", "email": "zoe@example.com"})
    response = mirror.deliver("booking.created", payload)
    mirror.wait_idle()

    assert response.status_code == 200
    events = mirror.events(JANE)
    assert events[0]["summary"] == "Café ☕ consult with Zoë Ångström 🎉"


def test_host_without_route_fails_delivery(google_connector, emulator):
    payload = booking(hostEmail=None, hostUserId="usr_nomail", hostName="No Mail")
    google_connector.deliver("booking.created", payload)
    google_connector.wait_idle()

    rows = google_connector.deliveries()
    assert rows[0]["state"] == "failed"
    assert "usr_nomail" in rows[0]["last_error"]
    assert emulator.requests == []


def test_host_deleted_event_is_recreated(google_connector, emulator):
    google_connector.deliver("booking.created", booking(), "2026-03-16T14:05:00Z")
    google_connector.wait_idle()
    emulator.delete_event_directly(JANE, event_id_for("bkg_xyz789", 0))

    google_connector.deliver("booking.rescheduled", booking(notes="x", startTime="2026-03-16T15:00:00Z",
                                                            endTime="2026-03-16T15:30:00Z"), "2026-03-16T14:30:00Z")
    google_connector.wait_idle()

    events = live_events(emulator)
    assert len(events) == 1
    assert events[0]["id"] == event_id_for("bkg_xyz789", 1)
    assert events[0]["start"]["dateTime"] == "2026-03-16T15:00:00Z"


def test_database_failure_answers_503(ics_connector):
    from sqlalchemy import text

    accepted = ics_connector.deliver("booking.created", booking(id="bkg_before"))
    ics_connector.wait_idle()
    with ics_connector.connector.engine.begin() as connection:
        connection.execute(text("ALTER TABLE deliveries RENAME TO deliveries_away"))

    refused = ics_connector.deliver("booking.created", booking(id="bkg_during"), delivery_id="dlv_during")

    with ics_connector.connector.engine.begin() as connection:
        connection.execute(text("ALTER TABLE deliveries_away RENAME TO deliveries"))
    retried = ics_connector.deliver("booking.created", booking(id="bkg_during"), delivery_id="dlv_during")
    ics_connector.wait_idle()

    assert accepted.status_code == 200
    assert refused.status_code == 503
    assert retried.status_code == 200
    assert retried.json()["status"] == "accepted"
    states = {row["booking_id"]: row["state"] for row in ics_connector.deliveries()}
    assert states == {"bkg_before": "applied", "bkg_during": "applied"}


def test_missing_status_warned_only_when_applied(mirror, caplog):
    caplog.set_level(logging.WARNING, logger="connector.sync")
    without_status = {key: value for key, value in booking().items() if key != "status"}

    mirror.deliver("booking.created", booking(), "2026-03-16T14:06:00Z")
    mirror.wait_idle()
    mirror.deliver("booking.created", without_status, "2026-03-16T14:05:00Z")  # older: stale
    mirror.wait_idle()
    stale_warnings = [record.getMessage() for record in caplog.records if "status" in record.getMessage()]
    mirror.deliver("booking.created", without_status, "2026-03-16T14:07:00Z")  # newer: applied
    mirror.wait_idle()
    warnings = [record.getMessage() for record in caplog.records if "status" in record.getMessage()]

    assert stale_warnings == []
    assert len(warnings) == 1
    assert warnings[0].endswith(": booking has no status; the event is kept as confirmed")
    assert warnings[0].startswith("booking bkg_xyz789 delivery ")
    assert [event["status"] for event in mirror.events(JANE)] == ["confirmed"]
