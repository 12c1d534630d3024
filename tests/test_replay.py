"""The operator's view of deliveries: `proximity-sync deliveries` and `proximity-sync replay`."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from connector import cli
from connector.storage import Delivery, utcnow
from tests.calendar_state import assert_mirrored, wait_settled
from tests.support import booking, running_connector, signed_delivery
from tests.support import connector_settings as connector_settings

JANE = "jane@example.com"


@pytest.fixture
def connector(tmp_path, emulator, service_account_key):
    """A running connector writing to the emulator."""
    settings = connector_settings(
        tmp_path,
        calendar_backend="google",
        google_credentials_file=service_account_key,
        google_api_endpoint=emulator.api_endpoint,
    )
    with ExitStack() as stack:
        yield stack.enter_context(running_connector(settings))


@pytest.fixture
def run_cli(connector, monkeypatch, tmp_path):
    """Return a function that runs `proximity-sync ARGS...` on the connector's database."""
    # configure_logging would replace pytest's log handlers with one bound to the runner's stream.
    monkeypatch.setattr(cli, "configure_logging", lambda *_args, **_kwargs: None)
    # Settings are also read from a .env file in the working folder; this one has none.
    monkeypatch.chdir(tmp_path)
    env = {
        "DATABASE_URL": connector.connector.settings.database_url,
        "CALENDAR_BACKEND": None,
        "GOOGLE_CREDENTIALS_FILE": None,
        "PROXIMITY_WEBHOOK_SECRET": None,
        "COLUMNS": "80",
    }

    def run(*args: str):
        return CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)

    return run


def fail_permanently(emulator) -> None:
    emulator.add_fault("POST", status=403, reason="forbidden", message="The caller cannot write to this calendar.",
                       times=None)


def test_deliveries_table_counts_failed_attempts(connector, emulator, run_cli):
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_applies"))
    wait_settled(connector)

    result = run_cli("deliveries")

    lines = result.output.splitlines()
    assert result.exit_code == 0
    assert "FAILED ATTEMPTS" in lines[0]
    assert lines[1].split()[:5] == ["dlv_applies", "bkg_xyz789", "booking.created", "applied", "0"]


def test_unusable_booking_error_names_booking_once(connector, run_cli):
    connector.send(signed_delivery("booking.created", booking(startTime="soon"), delivery_id="dlv_unusable"))
    wait_settled(connector)

    rows = json.loads(run_cli("deliveries", "--json").output)

    assert [row["state"] for row in rows] == ["failed"]
    assert rows[0]["last_error"] == "booking bkg_xyz789: no valid startTime (got 'soon')"


def test_deliveries_table_shows_failure_readably(connector, emulator, run_cli):
    fail_permanently(emulator)
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_fails"))
    wait_settled(connector)

    result = run_cli("deliveries", "--state", "failed")

    lines = result.output.splitlines()
    assert result.exit_code == 0
    assert lines[0].split() == ["DELIVERY", "BOOKING", "EVENT", "STATE", "FAILED", "ATTEMPTS", "RECEIVED", "NEXT", "ATTEMPT"]
    assert lines[1].split()[:5] == ["dlv_fails", "bkg_xyz789", "booking.created", "failed", "1"]
    assert lines[1].split()[-1] == "-"
    assert lines[2].startswith("    error: booking bkg_xyz789: 403 forbidden: events.insert of event")
    assert all(len(line) <= 80 for line in lines[2:])
    assert all(line.startswith(" " * 11) for line in lines[3:])
    error = " ".join(line.strip() for line in lines[2:]).removeprefix("error: ")
    assert error == connector.deliveries()[0]["last_error"]


def test_deliveries_json_has_every_field(connector, emulator, run_cli):
    fail_permanently(emulator)
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_fails"))
    wait_settled(connector)

    result = run_cli("deliveries", "--state", "failed", "--json")

    rows = json.loads(result.output)
    assert result.exit_code == 0
    assert len(rows) == 1
    row = rows[0]
    assert row["delivery"] == "dlv_fails"
    assert row["booking"] == "bkg_xyz789"
    assert row["event"] == "booking.created"
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert row["next_attempt"] is None
    assert "403 forbidden" in row["last_error"]
    assert "The caller cannot write to this calendar." in row["last_error"]
    assert row["payload_pruned"] is False


def test_deliveries_show_next_attempt_of_waiting_delivery(tmp_path, emulator, service_account_key, monkeypatch):
    settings = connector_settings(tmp_path, calendar_backend="google", google_credentials_file=service_account_key,
                                  google_api_endpoint=emulator.api_endpoint, delivery_retry_base_seconds=600,
                                  delivery_retry_max_seconds=600)
    monkeypatch.setattr(cli, "configure_logging", lambda *_args, **_kwargs: None)
    emulator.add_fault("POST", status=503, times=None)

    with running_connector(settings) as running:
        running.send(signed_delivery("booking.created", booking(), delivery_id="dlv_waits"))
        deadline = time.monotonic() + 10
        while running.deliveries()[0]["attempts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        result = CliRunner().invoke(cli.main, ["deliveries", "--json"], env={"DATABASE_URL": settings.database_url})

    row = json.loads(result.output)[0]
    next_attempt = datetime.fromisoformat(row["next_attempt"].replace("Z", "+00:00"))
    assert row["state"] == "pending"
    assert row["attempts"] == 1
    assert "503 backendError" in row["last_error"]
    assert utcnow() + timedelta(seconds=250) < next_attempt < utcnow() + timedelta(seconds=610)


def test_deliveries_without_match_says_so(connector, run_cli):
    result = run_cli("deliveries", "--state", "failed")

    assert result.exit_code == 0
    assert result.output == "No deliveries match.\n"


def test_deliveries_limit_keeps_newest(connector, run_cli):
    for number in range(3):
        connector.send(signed_delivery("booking.created", booking(id=f"bkg_{number}"), delivery_id=f"dlv_{number}"))
    wait_settled(connector)

    rows = json.loads(run_cli("deliveries", "--limit", "2", "--json").output)

    assert [row["delivery"] for row in rows] == ["dlv_2", "dlv_1"]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_deliveries_limit_below_one_rejected(connector, run_cli, limit):
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_listed"))
    wait_settled(connector)

    result = run_cli("deliveries", "--limit", limit)

    assert result.exit_code == 2
    assert "Invalid value for '--limit'" in result.output
    assert f"{limit} is not in the range x>=1" in result.output
    assert "dlv_listed" not in result.output


def test_replay_failed_delivery_applies_it(connector, emulator, run_cli):
    fail_permanently(emulator)
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_fails"))
    wait_settled(connector)
    emulator.clear_faults()

    result = run_cli("replay", "dlv_fails")
    wait_settled(connector)

    assert result.exit_code == 0
    assert result.output == "dlv_fails  queued again (had failed after 1 attempt)\nQueued 1 of 1 deliveries.\n"
    delivery = connector.deliveries()[0]
    assert delivery["state"] == "applied"
    assert delivery["attempts"] == 0
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_replay_counts_several_attempts(connector, emulator, run_cli):
    fail_permanently(emulator)
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_fails"))
    wait_settled(connector)
    with connector.connector.engine.begin() as connection:
        connection.execute(update(Delivery).where(Delivery.delivery_id == "dlv_fails").values(attempts=3))

    result = run_cli("replay", "--json", "dlv_fails")

    rows = json.loads(result.output)
    assert rows[0]["message"] == "queued again (had failed after 3 attempts)"


def test_replay_pending_delivery_counts_failures(connector, run_cli):
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_waits"))
    wait_settled(connector)
    with connector.connector.engine.begin() as connection:
        connection.execute(update(Delivery).values(state="pending", attempts=1, next_attempt_at=utcnow() + timedelta(hours=1)))

    result = run_cli("replay", "--json", "dlv_waits")

    rows = json.loads(result.output)
    assert rows[0]["message"] == "already pending after 1 attempt failed; now due at once"


def test_replay_applied_delivery_changes_nothing(connector, emulator, run_cli):
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_done"))
    wait_settled(connector)
    before = connector.deliveries()
    calls_before = len(emulator.requests)

    result = run_cli("replay", "dlv_done")
    time.sleep(0.3)
    wait_settled(connector)

    assert result.exit_code == 0
    assert result.output.startswith("dlv_done  not queued: already applied to booking bkg_xyz789")
    assert result.output.endswith("Queued 0 of 1 deliveries.\n")
    assert connector.deliveries() == before
    assert len(emulator.requests) == calls_before
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_replay_older_than_applied_changes_nothing(connector, emulator, run_cli):
    fail_permanently(emulator)
    connector.send(signed_delivery("booking.created", booking(), "2026-03-16T14:05:00Z", delivery_id="dlv_old"))
    wait_settled(connector)
    emulator.clear_faults()
    moved = booking(startTime="2026-03-17T09:00:00Z", endTime="2026-03-17T09:30:00Z")
    connector.send(signed_delivery("booking.rescheduled", moved, "2026-03-16T15:00:00Z", delivery_id="dlv_new"))
    wait_settled(connector)

    result = run_cli("replay", "dlv_old")
    time.sleep(0.3)
    wait_settled(connector)

    states = {row["delivery_id"]: row["state"] for row in connector.deliveries()}
    assert result.output.startswith("dlv_old  not queued: booking bkg_xyz789 has a newer snapshot applied (delivery dlv_new)")
    assert states == {"dlv_old": "stale", "dlv_new": "applied"}
    assert emulator.events(JANE)[0]["start"]["dateTime"] == "2026-03-17T09:00:00Z"
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_replay_failed_narrowed_by_booking_and_since(connector, emulator, run_cli):
    fail_permanently(emulator)
    for number in range(3):
        connector.send(signed_delivery("booking.created", booking(id=f"bkg_{number}"), delivery_id=f"dlv_{number}"))
    wait_settled(connector)
    long_ago = utcnow() - timedelta(days=2)
    with connector.connector.engine.begin() as connection:
        connection.execute(update(Delivery).where(Delivery.delivery_id == "dlv_0").values(finished_at=long_ago))
    emulator.clear_faults()

    by_booking = run_cli("replay", "--failed", "--booking", "bkg_2")
    wait_settled(connector)
    since = run_cli("replay", "--failed", "--since", (utcnow() - timedelta(days=1)).isoformat())
    wait_settled(connector)

    states = {row["delivery_id"]: row["state"] for row in connector.deliveries()}
    assert by_booking.output.splitlines()[0].startswith("dlv_2  queued again")
    assert since.output.splitlines() == ["dlv_1  queued again (had failed after 1 attempt)", "Queued 1 of 1 deliveries."]
    assert states == {"dlv_0": "failed", "dlv_1": "applied", "dlv_2": "applied"}
    assert_mirrored(emulator, [JANE], active=["bkg_1", "bkg_2"], removed=["bkg_0"])


def test_replay_failed_without_match_says_so(connector, run_cli):
    result = run_cli("replay", "--failed")

    assert result.exit_code == 0
    assert result.output == "No failed deliveries match.\n"


def test_replay_unknown_id_exits_1(connector, emulator, run_cli):
    connector.send(signed_delivery("booking.created", booking(), delivery_id="dlv_done"))
    wait_settled(connector)

    result = run_cli("replay", "dlv_nope", "dlv_done")

    assert result.exit_code == 1
    assert result.stderr == "No delivery with id dlv_nope.\n"
    assert result.stdout.endswith("Queued 0 of 2 deliveries.\n")


def test_replay_ignored_delivery_is_not_queued(connector, emulator, run_cli):
    connector.send(signed_delivery("booking.paymentReceived", booking(), delivery_id="dlv_unknown"))
    wait_settled(connector)

    result = run_cli("replay", "dlv_unknown")
    time.sleep(0.2)

    assert result.output.startswith("dlv_unknown  not queued: booking.paymentReceived is not a booking event")
    assert connector.deliveries()[0]["state"] == "ignored"
    assert emulator.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name delivery ids, or use --failed"),
        (["dlv_1", "--booking", "bkg_1"], "--booking and --since only narrow --failed"),
        (["--failed", "--since", "yesterday"], "'yesterday' is not an ISO 8601 time"),
    ],
)
def test_replay_rejects_bad_arguments(run_cli, args, message):
    result = run_cli("replay", *args)

    assert result.exit_code == 2
    assert message in result.output


def test_replay_json_lists_each_delivery(tmp_path, monkeypatch):
    import json as json_module

    from click.testing import CliRunner

    from connector.cli import main
    from tests.support import booking, connector_settings, running_connector

    settings = connector_settings(tmp_path)
    with running_connector(settings) as running:
        running.deliver("booking.created", booking(), delivery_id="dlv_json")
        running.wait_idle()
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["replay", "--json", "dlv_json", "dlv_absent"], env={"DATABASE_URL": settings.database_url})

    rows = json_module.loads(result.output)
    assert result.exit_code == 1
    assert [row["delivery"] for row in rows] == ["dlv_json", "dlv_absent"]
    assert rows[0]["queued"] is False
    assert rows[1]["message"] == "no delivery with this id"
