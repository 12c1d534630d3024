"""`proximity-sync send-test` against `proximity-sync serve` running as a process, writing to the emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from connector.decisions import event_id_for
from tests.operator_support import ServedConnector, free_port, invoke, keep_logging, served_connector, settings_env  # noqa: F401
from tests.support import booking

JANE = "jane@example.com"
OMAR = "omar@example.com"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_logging")]


@pytest.fixture
def env(google_settings) -> dict[str, str]:
    return settings_env(google_settings)


@pytest.fixture
def served(tmp_path, env) -> Iterator[ServedConnector]:
    with served_connector(tmp_path, env) as running:
        yield running


def send_test(served: ServedConnector, env: dict[str, str], *args: str):
    return invoke(["send-test", "--url", served.webhook_url, "--timeout", "20", *args], env)


def test_send_test_prints_answer_and_event(served, env, emulator):
    before = datetime.now(UTC)
    result = send_test(served, env, "--wait")
    after = datetime.now(UTC)

    assert result.exit_code == 0, result.output
    assert "Response: 200 OK: accepted" in result.stdout
    event_id = event_id_for("bkg_xyz789", 0)
    assert f"Calendar event: {event_id} in calendar {JANE}" in result.stdout
    assert "  summary: 30 Minute Call with Alex Johnson" in result.stdout
    tomorrow = {f"{(moment + timedelta(days=1)).date().isoformat()}T14:00:00Z" for moment in (before, after)}
    start_line = next(line for line in result.stdout.splitlines() if line.startswith("  start:"))
    assert start_line.split()[1] in tomorrow
    events = emulator.events(JANE)
    assert [event["id"] for event in events] == [event_id]
    assert events[0]["start"]["dateTime"][:10] in {text[:10] for text in tomorrow}


def test_send_test_cancel_removes_event(served, env, emulator):
    created = send_test(served, env, "--wait")
    cancelled = send_test(served, env, "--event", "booking.cancelled", "--wait")

    assert created.exit_code == 0, created.output
    assert cancelled.exit_code == 0, cancelled.output
    assert "Sent booking.cancelled for booking bkg_xyz789" in cancelled.stdout
    assert "has no calendar event now (state deleted)" in cancelled.stdout
    assert emulator.events(JANE) == []


def test_send_test_host_option_routes_booking(served, env, emulator):
    result = send_test(served, env, "--host", OMAR, "--wait")

    assert result.exit_code == 0, result.output
    assert f"in calendar {OMAR}" in result.stdout
    assert len(emulator.events(OMAR)) == 1
    assert emulator.events(JANE) == []


def test_send_test_sends_booking_file(served, env, emulator, tmp_path):
    payload_file = tmp_path / "booking.json"
    payload_file.write_text(json.dumps(booking(id="bkg_from_file", eventTypeName="Intro")))
    envelope_file = tmp_path / "envelope.json"
    envelope = {"event": "booking.created", "createdAt": "2026-03-01T10:00:00Z",
                "payload": booking(id="bkg_pending", status="PendingApproval")}
    envelope_file.write_text(json.dumps(envelope))

    from_payload = send_test(served, env, "--booking", str(payload_file), "--wait")
    from_envelope = send_test(served, env, "--booking", str(envelope_file), "--wait")

    assert from_payload.exit_code == 0, from_payload.output
    assert from_envelope.exit_code == 0, from_envelope.output
    summaries = {event["id"]: event["summary"] for event in emulator.events(JANE)}
    assert summaries[event_id_for("bkg_from_file", 0)] == "Intro with Alex Johnson"
    assert summaries[event_id_for("bkg_pending", 0)].startswith("Pending: ")
    assert "  status:  tentative" in from_envelope.stdout


def test_send_test_refused_with_wrong_secret(served, env, emulator):
    result = send_test(served, {**env, "PROXIMITY_WEBHOOK_SECRET": "not-the-connector-secret"})

    assert result.exit_code == 1
    assert "Response: 401 Unauthorized" in result.stdout
    assert "PROXIMITY_WEBHOOK_SECRET differs" in result.stderr
    assert emulator.requests == []


def test_send_test_names_connector_without_secret(tmp_path, env, emulator):
    with served_connector(tmp_path, {**env, "PROXIMITY_WEBHOOK_SECRET": ""}) as served:
        result = send_test(served, env)

    assert result.exit_code == 1
    assert "Response: 401 Unauthorized: no webhook secret is configured" in result.stdout
    assert "The connector has no webhook secret" in result.stderr
    assert "differs" not in result.stderr
    assert emulator.requests == []


def test_send_test_without_wait_only_sends(served, env):
    result = send_test(served, env)

    assert result.exit_code == 0, result.output
    assert "Response: 200 OK: accepted" in result.stdout
    assert "Calendar event" not in result.stdout


def test_send_test_reports_unreachable_connector(env):
    url = f"http://127.0.0.1:{free_port()}/webhooks/proximity"

    result = invoke(["send-test", "--url", url, "--timeout", "5"], env)

    assert result.exit_code == 1
    assert f"could not send to {url}" in result.stderr
    assert "proximity-sync serve" in result.stderr


def test_send_test_requires_secret(env):
    result = invoke(["send-test"], {**env, "PROXIMITY_WEBHOOK_SECRET": ""})

    assert result.exit_code == 1
    assert "PROXIMITY_WEBHOOK_SECRET is empty" in result.stderr


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must contain a JSON object"),
        ('{"status": "Confirmed"}', "the booking has no id"),
    ],
)
def test_send_test_rejects_bad_booking_file(env, tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)

    result = invoke(["send-test", "--booking", str(path)], env)

    assert result.exit_code == 2
    assert problem in result.stderr


def test_send_test_defaults_to_public_url(served, env, emulator):
    result = invoke(["send-test", "--timeout", "20", "--wait"], {**env, "PUBLIC_URL": served.base_url})

    assert result.exit_code == 0, result.output
    sent_line = result.stdout.splitlines()[0]
    assert sent_line.startswith("Sent booking.created for booking bkg_xyz789 as delivery test_")
    assert sent_line.endswith(f" to {served.base_url}/webhooks/proximity")
    assert "Response: 200 OK: accepted" in result.stdout
    assert [event["id"] for event in emulator.events(JANE)] == [event_id_for("bkg_xyz789", 0)]


def test_send_test_url_overrides_public_url(served, env):
    unused = f"http://127.0.0.1:{free_port()}"

    result = invoke(["send-test", "--url", served.webhook_url, "--timeout", "20"], {**env, "PUBLIC_URL": unused})

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith(f" to {served.webhook_url}")
    assert unused not in result.output


def test_send_test_help_names_public_url(env):
    result = invoke(["send-test", "--help"], env)

    assert result.exit_code == 0
    help_text = " ".join(result.stdout.split())
    assert "Default: PUBLIC_URL followed by /webhooks/proximity when PUBLIC_URL is set" in help_text
    assert "else http://127.0.0.1:8000/webhooks/proximity" in help_text
