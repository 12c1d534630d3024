"""Log lines: the JSON and text formats, their delivery fields, and no invitee details at INFO or above."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import httpx
import pytest

from connector.decisions import event_id_for
from connector.logs import bind_delivery, clear_delivery, configure_logging
from connector.settings import SettingsError, load_settings
from tests.operator_support import keep_logging, served_connector, settings_env  # noqa: F401
from tests.support import SECRET, booking, running_connector, signed_delivery

JANE = "jane@example.com"
INVITEE_EMAIL = "zq.invitee.7731@example.org"
INVITEE_PHONE = "+44 7700 900123"

pytestmark = pytest.mark.usefixtures("keep_logging")


def private_booking(**changes):
    invitee = {
        "name": "Quinn Example",
        "email": INVITEE_EMAIL,
        "phone": INVITEE_PHONE,
        "timezone": "Europe/London",
        "notes": f"Call me on {INVITEE_PHONE} or write to {INVITEE_EMAIL}",
    }
    return booking(invitee=invitee, customFields={"email": INVITEE_EMAIL}, **changes)


def leaked_values(text: str) -> list[str]:
    return [secret for secret in (INVITEE_EMAIL, INVITEE_PHONE, "7700 900123", SECRET, "ya29.") if secret in text]


@pytest.mark.slow
def test_json_log_fields_without_invitee_details(tmp_path, emulator, google_settings):
    env = settings_env(google_settings, LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    emulator.add_fault(method="POST", status=503, reason="backendError", times=1)
    created = signed_delivery("booking.created", private_booking(), "2026-03-16T14:05:00Z", delivery_id="dlv_log_created")
    cancelled = signed_delivery("booking.cancelled", private_booking(status="Cancelled"), "2026-03-16T14:09:00Z", delivery_id="dlv_log_cancelled")

    with served_connector(tmp_path, env) as served:
        for delivery in (created, cancelled):
            response = httpx.post(served.webhook_url, content=delivery.body, headers=delivery.headers, trust_env=False)
            assert response.status_code == 200
            # The worker's outcome line, unlike the receiver's, has a colon right after the id.
            deadline = time.monotonic() + 20
            while f"delivery {delivery.delivery_id}: " not in served_log(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.05)

    records = []
    for line in served.stderr_lines:
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            records.append({"level": "INFO", "logger": "(text line)", "message": line})

    visible = [record for record in records if record["level"] in ("INFO", "WARNING", "ERROR", "CRITICAL")]
    assert emulator.events(JANE, include_deleted=True)[0]["description"].count(INVITEE_EMAIL) >= 1
    assert [record for record in visible if leaked_values(json.dumps(record, ensure_ascii=False))] == []

    outcomes = [record for record in visible if record["logger"] == "connector.sync" and record.get("outcome")]
    assert [record["delivery_id"] for record in outcomes] == ["dlv_log_created", "dlv_log_cancelled"]
    assert [record["action"] for record in outcomes] == ["created", "deleted"]
    assert all(record["booking_id"] == "bkg_xyz789" for record in outcomes)
    assert all(record["calendar"] == JANE for record in outcomes)
    assert all(isinstance(record["duration_ms"], float) for record in outcomes)

    calls = [record for record in visible if record["logger"] == "connector.calendars.google"]
    assert [(record["action"], record["status"]) for record in calls] == [
        ("events.insert", 503), ("events.insert", 200), ("events.delete", 204),
    ]
    assert [record["delivery_id"] for record in calls] == ["dlv_log_created", "dlv_log_created", "dlv_log_cancelled"]
    assert all(record["booking_id"] == "bkg_xyz789" and record["calendar"] == JANE for record in calls)
    assert all(record["duration_ms"] >= 0 for record in calls)
    assert calls[1]["event_id"] == event_id_for("bkg_xyz789", 0)

    retries = [record for record in visible if record["level"] == "WARNING" and "retrying" in record["message"]]
    assert len(retries) == 1
    assert retries[0]["delivery_id"] == "dlv_log_created"


def served_log(tmp_path) -> str:
    return "".join(path.read_text() for path in tmp_path.glob("serve-*.log"))


def test_info_records_without_invitee_details(google_settings, emulator, caplog):
    caplog.set_level(logging.DEBUG)

    with running_connector(google_settings) as running:
        running.deliver("booking.created", private_booking(), "2026-03-16T14:05:00Z")
        running.wait_idle()
        running.deliver("booking.rescheduled", private_booking(startTime="2026-03-18T09:00:00Z", endTime="2026-03-18T09:30:00Z"), "2026-03-16T14:06:00Z")
        running.wait_idle()
        emulator.add_fault(method="PATCH", status=400, reason="invalid", message="Invalid value", times=None)
        running.deliver("booking.noShow", private_booking(status="NoShow"), "2026-03-16T14:07:00Z")
        running.wait_idle()
        emulator.clear_faults()
        running.deliver("booking.cancelled", private_booking(status="Cancelled"), "2026-03-16T14:08:00Z")
        running.wait_idle()
        states = [delivery["state"] for delivery in running.deliveries()]

    # The failed no-show is superseded by the cancellation applied after it.
    assert states == ["applied", "applied", "stale", "applied"]
    visible = [record for record in caplog.records if record.levelno >= logging.INFO]
    assert any(record.name == "connector.sync" for record in visible)
    assert any(record.levelno == logging.ERROR and "400 invalid" in record.getMessage() for record in visible)
    for record in visible:
        text = record.getMessage() + " " + " ".join(str(value) for value in vars(record).values())
        assert leaked_values(text) == [], f"{record.name}: {record.getMessage()}"


def test_text_format_appends_bound_delivery(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", "text")
    log = logging.getLogger("connector.test_logging")

    bind_delivery("bkg_text", "dlv_text")
    log.info("events.insert calendar=%s status=200", JANE)
    log.info("booking bkg_text delivery dlv_text: created event")
    clear_delivery()
    log.info("after the sync")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("INFO connector.test_logging: events.insert calendar=jane@example.com status=200 (booking bkg_text, delivery dlv_text)")
    assert lines[1].endswith("booking bkg_text delivery dlv_text: created event")
    assert lines[2].endswith("after the sync")


def test_json_format_writes_one_object_per_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", "json")
    log = logging.getLogger("connector.test_logging")

    bind_delivery("bkg_json", "dlv_json")
    log.info("call done", extra={"action": "events.patch", "duration_ms": 12.5})
    log.debug("not shown at INFO")
    clear_delivery()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")

    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(records) == 2
    assert records[0]["message"] == "call done"
    assert records[0]["level"] == "INFO"
    assert records[0]["logger"] == "connector.test_logging"
    assert records[0]["booking_id"] == "bkg_json"
    assert records[0]["delivery_id"] == "dlv_json"
    assert records[0]["action"] == "events.patch"
    assert records[0]["duration_ms"] == 12.5
    assert records[0]["time"].endswith("+00:00")
    assert "booking_id" not in records[1]
    assert "ValueError: boom" in records[1]["exception"]


def test_log_format_setting_is_checked():
    assert load_settings(_env_file=None, log_format="JSON").log_format == "json"

    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None, log_format="xml")

    assert "LOG_FORMAT is invalid" in str(raised.value)
