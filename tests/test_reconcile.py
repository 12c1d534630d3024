"""`proximity-sync reconcile` after events are changed, deleted and duplicated behind the connector's back."""

from __future__ import annotations

import json

import pytest

from connector.calendars.base import Target
from connector.decisions import event_id_for
from connector.queue import acquire_lease
from tests.operator_support import invoke, keep_logging, settings_env  # noqa: F401
from tests.support import booking
from tests.support import connector_settings as make_settings

JANE = "jane@example.com"
OMAR = "omar@example.com"

pytestmark = pytest.mark.usefixtures("keep_logging")


def extra_event(event_id: str, booking_id: str, summary: str = "Copied by hand") -> dict:
    return {
        "id": event_id,
        "summary": summary,
        "start": {"dateTime": "2026-03-16T14:00:00Z"},
        "end": {"dateTime": "2026-03-16T14:30:00Z"},
        "extendedProperties": {"private": {"proximityBookingId": booking_id}},
    }


@pytest.fixture
def mirrored(google_connector):
    """Three bookings of Jane mirrored into her calendar."""
    for booking_id in ("bkg_a", "bkg_b", "bkg_c"):
        google_connector.deliver("booking.created", booking(id=booking_id, eventTypeName=f"Call {booking_id}"))
    google_connector.wait_idle()
    return google_connector


def reconcile(running, *args: str):
    return invoke(["reconcile", *args], settings_env(running.connector.settings))


def drift_lines(result) -> list[str]:
    kinds = ("missing", "changed", "duplicate", "unknown")
    return [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in kinds]


def test_reconcile_finds_no_drift(mirrored, emulator):
    result = reconcile(mirrored)

    assert result.exit_code == 0, result.output
    assert "Compared 3 bookings with 1 calendar." in result.stdout
    assert "No drift found." in result.stdout
    assert drift_lines(result) == []


def test_reconcile_reports_changed_event(mirrored, emulator):
    event_id = event_id_for("bkg_a", 0)
    emulator.patch_event_directly(JANE, event_id, {"summary": "Edited by hand"})

    result = reconcile(mirrored)

    assert result.exit_code == 1
    (line,) = drift_lines(result)
    assert line.startswith("changed")
    assert f"booking bkg_a  calendar {JANE}  event {event_id}: changed in the calendar: summary" in line
    assert "reconcile --fix" in result.stdout
    assert emulator.event(JANE, event_id)["summary"] == "Edited by hand"


def test_reconcile_fix_restores_changed_event(mirrored, emulator):
    event_id = event_id_for("bkg_a", 0)
    emulator.patch_event_directly(JANE, event_id, {"summary": "Edited by hand", "location": "Room 4"})
    emulator.clear_faults()
    writes_before = len([request for request in emulator.requests if request.method != "GET"])

    fixed = reconcile(mirrored, "--fix")
    again = reconcile(mirrored)

    assert fixed.exit_code == 0, fixed.output
    assert "fixed: updated location, summary of event" in fixed.stdout
    event = emulator.event(JANE, event_id)
    assert event["summary"] == "Call bkg_a with Alex Johnson"
    assert event["location"] == "https://meet.google.com/abc-defg-hij"
    patches = [request for request in emulator.requests if request.method == "PATCH"]
    assert len(patches) == 1
    assert set(patches[0].body) == {"location", "summary"}
    assert len([request for request in emulator.requests if request.method != "GET"]) == writes_before + 1
    assert mirrored.mapping("bkg_a")["event_id"] == event_id
    assert mirrored.mapping("bkg_a")["version"] == "2026-03-16T14:05:00.000000Z"
    assert again.exit_code == 0, again.output
    assert "No drift found." in again.stdout


def test_reconcile_reports_deleted_event(mirrored, emulator):
    event_id = event_id_for("bkg_b", 0)
    emulator.delete_event_directly(JANE, event_id)

    result = reconcile(mirrored)

    assert result.exit_code == 1
    (line,) = drift_lines(result)
    assert line.startswith("missing")
    assert f"booking bkg_b  calendar {JANE}  event {event_id}: deleted in the calendar" in line
    assert emulator.event(JANE, event_id)["status"] == "cancelled"


def test_reconcile_fix_recreates_deleted_event(mirrored, emulator):
    emulator.delete_event_directly(JANE, event_id_for("bkg_b", 0))

    fixed = reconcile(mirrored, "--fix")
    again = reconcile(mirrored)

    new_id = event_id_for("bkg_b", 1)
    assert fixed.exit_code == 0, fixed.output
    assert f"fixed: created event {new_id} in {JANE}" in fixed.stdout
    assert emulator.event(JANE, new_id)["status"] == "confirmed"
    assert emulator.event(JANE, new_id)["summary"] == "Call bkg_b with Alex Johnson"
    mapping = mirrored.mapping("bkg_b")
    assert mapping["event_id"] == new_id
    assert mapping["generation"] == 1
    assert mapping["state"] == "live"
    (delivery,) = mirrored.deliveries("bkg_b")
    assert delivery["state"] == "applied"
    assert again.exit_code == 0, again.output


def test_reconcile_reports_duplicate_and_unknown(mirrored, emulator):
    duplicate_id = event_id_for("bkg_c", 3)
    unknown_id = event_id_for("bkg_unknown", 0)
    emulator.insert_event_directly(JANE, extra_event(duplicate_id, "bkg_c"))
    emulator.insert_event_directly(JANE, extra_event(unknown_id, "bkg_unknown"))

    result = reconcile(mirrored)

    assert result.exit_code == 1
    lines = drift_lines(result)
    assert len(lines) == 2
    duplicate = next(line for line in lines if line.startswith("duplicate"))
    unknown = next(line for line in lines if line.startswith("unknown"))
    assert f"event {duplicate_id}: a second event of the booking, which has {event_id_for('bkg_c', 0)}" in duplicate
    assert f"booking bkg_unknown  calendar {JANE}  event {unknown_id}: carries a booking id that the mapping table does not know" in unknown
    assert "Drift: 1 duplicate, 1 unknown." in result.stdout


def test_reconcile_fix_deletes_connector_events_only(mirrored, emulator):
    duplicate_id = event_id_for("bkg_c", 3)
    unknown_id = event_id_for("bkg_unknown", 0)
    handmade_id = "handmade0001"
    emulator.insert_event_directly(JANE, extra_event(duplicate_id, "bkg_c"))
    emulator.insert_event_directly(JANE, extra_event(unknown_id, "bkg_unknown"))
    emulator.insert_event_directly(JANE, extra_event(handmade_id, "bkg_a"))

    fixed = reconcile(mirrored, "--fix")
    again = reconcile(mirrored)

    assert fixed.exit_code == 1
    assert emulator.event(JANE, duplicate_id)["status"] == "cancelled"
    assert emulator.event(JANE, unknown_id)["status"] == "cancelled"
    assert emulator.event(JANE, handmade_id)["status"] == "confirmed"
    assert f"fixed: deleted event {duplicate_id} from {JANE}" in fixed.stdout
    assert "not fixed: the connector did not write this event" in fixed.stdout
    assert "Fixed 2 of 3; 1 left." in fixed.stdout
    assert emulator.event(JANE, event_id_for("bkg_c", 0))["status"] == "confirmed"
    (remaining,) = drift_lines(again)
    assert remaining.startswith("duplicate")
    assert f"event {handmade_id}" in remaining
    assert "delete them in the calendar" in again.stdout
    assert "reconcile --fix" not in again.stdout


def test_reconcile_fix_repairs_everything_at_once(mirrored, emulator):
    emulator.patch_event_directly(JANE, event_id_for("bkg_a", 0), {"start": {"dateTime": "2026-03-16T15:00:00Z"}, "end": {"dateTime": "2026-03-16T15:30:00Z"}})
    emulator.delete_event_directly(JANE, event_id_for("bkg_b", 0))
    # An orphan of the generation a re-created event of bkg_b would take.
    emulator.insert_event_directly(JANE, extra_event(event_id_for("bkg_b", 1), "bkg_b"))
    emulator.insert_event_directly(JANE, extra_event(event_id_for("bkg_gone", 0), "bkg_gone"))

    before = reconcile(mirrored)
    fixed = reconcile(mirrored, "--fix")
    after = reconcile(mirrored)

    assert sorted(line.split(" ", 1)[0] for line in drift_lines(before)) == ["changed", "duplicate", "missing", "unknown"]
    assert fixed.exit_code == 0, fixed.output
    assert after.exit_code == 0, after.output
    assert "No drift found." in after.stdout
    live = {event["id"]: event for event in emulator.events(JANE)}
    assert set(live) == {event_id_for("bkg_a", 0), event_id_for("bkg_b", 2), event_id_for("bkg_c", 0)}
    assert live[event_id_for("bkg_a", 0)]["start"]["dateTime"] == "2026-03-16T14:00:00Z"
    assert live[event_id_for("bkg_b", 2)]["summary"] == "Call bkg_b with Alex Johnson"
    assert mirrored.mapping("bkg_b")["event_id"] == event_id_for("bkg_b", 2)


def test_reconcile_cancelled_booking_event_duplicate(mirrored, emulator):
    mirrored.deliver("booking.cancelled", booking(id="bkg_c", status="Cancelled"), "2026-03-16T15:00:00Z")
    mirrored.wait_idle()
    emulator.insert_event_directly(JANE, extra_event(event_id_for("bkg_c", 1), "bkg_c"))

    result = reconcile(mirrored)
    fixed = reconcile(mirrored, "--fix")

    (line,) = drift_lines(result)
    assert line.startswith("duplicate")
    assert "the booking should have no event (its mapping is deleted)" in line
    assert fixed.exit_code == 0, fixed.output
    assert emulator.event(JANE, event_id_for("bkg_c", 1))["status"] == "cancelled"


def test_reconcile_json_report(mirrored, emulator):
    emulator.delete_event_directly(JANE, event_id_for("bkg_b", 0))

    result = reconcile(mirrored, "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["bookings_compared"] == 3
    assert report["calendars"] == [{"calendar": JANE, "booking_events": 2, "error": None}]
    assert report["counts"] == {"missing": 1}
    (item,) = report["drift"]
    assert item["kind"] == "missing"
    assert item["booking_id"] == "bkg_b"
    assert item["event_id"] == event_id_for("bkg_b", 0)
    assert item["fixed"] is False
    assert report["remaining"] == 1


def test_reconcile_host_narrows_scope(mirrored, emulator):
    mirrored.deliver("booking.created", booking(id="bkg_omar", hostEmail=OMAR))
    mirrored.wait_idle()
    emulator.delete_event_directly(OMAR, event_id_for("bkg_omar", 0))

    for_jane = reconcile(mirrored, "--host", JANE)
    for_omar = reconcile(mirrored, "--host", OMAR)

    assert for_jane.exit_code == 0, for_jane.output
    assert "Compared 3 bookings with 1 calendar." in for_jane.stdout
    assert for_omar.exit_code == 1
    assert "Compared 1 bookings with 1 calendar." in for_omar.stdout
    (line,) = drift_lines(for_omar)
    assert "booking bkg_omar" in line


def test_reconcile_since_skips_earlier_bookings(mirrored, emulator):
    mirrored.deliver("booking.created", booking(id="bkg_april", startTime="2026-04-01T09:00:00Z", endTime="2026-04-01T09:30:00Z"))
    mirrored.wait_idle()
    emulator.delete_event_directly(JANE, event_id_for("bkg_a", 0))
    emulator.patch_event_directly(JANE, event_id_for("bkg_april", 0), {"summary": "Edited"})

    result = reconcile(mirrored, "--since", "2026-03-20")

    assert result.exit_code == 1
    assert "Compared 1 bookings with 1 calendar." in result.stdout
    (line,) = drift_lines(result)
    assert line.startswith("changed")
    assert "booking bkg_april" in line


def test_reconcile_skips_booking_a_worker_holds(mirrored, emulator):
    emulator.delete_event_directly(JANE, event_id_for("bkg_a", 0))
    acquire_lease(mirrored.connector.engine, "bkg_a", "another-worker", 60)

    result = reconcile(mirrored, "--fix")

    assert result.exit_code == 0, result.output
    assert "Skipped 1 bookings that the worker is syncing now: bkg_a" in result.stdout
    assert drift_lines(result) == []
    assert emulator.event(JANE, event_id_for("bkg_a", 0))["status"] == "cancelled"


def test_reconcile_reports_unreadable_calendar(mirrored, emulator):
    emulator.add_fault(method="GET", path_contains="/events", status=403, reason="forbidden", times=None)

    result = reconcile(mirrored)

    assert result.exit_code == 1
    assert f"error: calendar {JANE} could not be read: 403 forbidden" in result.stdout


def test_reconcile_stays_quiet_in_pipes(mirrored, emulator):
    result = reconcile(mirrored)

    assert "Reading calendars" not in result.output
    assert "Comparing bookings" not in result.output


def test_reconcile_draws_progress_on_terminal(mirrored, emulator, monkeypatch):
    monkeypatch.setattr("connector.operator.progress.is_terminal", lambda: True)

    result = reconcile(mirrored)

    assert "Reading calendars" in result.stderr
    assert "Comparing bookings" in result.stderr
    assert "Reading calendars" not in result.stdout


def test_reconcile_rejects_bad_since(mirrored):
    result = reconcile(mirrored, "--since", "last tuesday")

    assert result.exit_code == 2
    assert "is not an ISO 8601 date or time" in result.stderr


def test_reconcile_fix_on_ics_backend(ics_connector):
    ics_connector.deliver("booking.created", booking())
    ics_connector.wait_idle()
    backend = ics_connector.connector.backend
    event_id = event_id_for("bkg_xyz789", 0)
    backend.patch_event(Target(JANE, JANE), event_id, {"summary": "Edited in the database"})

    before = reconcile(ics_connector)
    fixed = reconcile(ics_connector, "--fix")

    assert before.exit_code == 1
    (line,) = drift_lines(before)
    assert line.startswith("changed")
    assert fixed.exit_code == 0, fixed.output
    assert backend.get_event(Target(JANE, JANE), event_id).body["summary"] == "30 Minute Call with Alex Johnson"


def test_reconcile_on_empty_database(tmp_path, emulator):
    result = invoke(["reconcile"], settings_env(make_settings(tmp_path)))

    assert result.exit_code == 0, result.output
    assert "Compared 0 bookings with 0 calendars." in result.stdout
