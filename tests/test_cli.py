"""Command-line behaviour a newcomer meets first: feeds, wrong folders, bad settings."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from sqlalchemy.exc import DBAPIError

from connector.cli import main
from connector.settings import Settings
from connector.storage import explain_database_error
from tests.support import SECRET, booking, running_connector, connector_settings


@pytest.fixture
def runner(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith(("PROXIMITY_", "GOOGLE_", "DATABASE_", "MAPPINGS_", "CALENDAR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_feeds_lists_urls_after_first_event(runner, tmp_path):
    settings = connector_settings(tmp_path)
    with running_connector(settings) as running:
        running.deliver("booking.created", booking())
        running.wait_idle()

    env = {"DATABASE_URL": settings.database_url, "PROXIMITY_WEBHOOK_SECRET": SECRET}
    text = runner.invoke(main, ["feeds", "--base-url", "https://sync.example.com"], env=env)
    listed = runner.invoke(main, ["feeds", "--json"], env=env)

    assert text.exit_code == 0
    assert text.output.startswith("jane@example.com: https://sync.example.com/feeds/")
    assert text.output.strip().endswith(".ics")
    rows = json.loads(listed.output)
    assert [row["calendar"] for row in rows] == ["jane@example.com"]
    assert rows[0]["url"].startswith("http://127.0.0.1:8000/feeds/")


def test_feeds_before_any_event(runner, tmp_path):
    settings = connector_settings(tmp_path)
    with running_connector(settings):
        pass

    result = runner.invoke(main, ["feeds"], env={"DATABASE_URL": settings.database_url})

    assert result.exit_code == 0
    assert "No feeds yet" in result.output


@pytest.mark.parametrize("command", [["deliveries"], ["booking", "bkg_1"], ["feeds"], ["replay", "--failed"]])
def test_read_command_in_wrong_folder(runner, tmp_path, command):
    result = runner.invoke(main, command)

    assert result.exit_code == 1
    assert f"no database at {tmp_path / 'proximity-sync.db'}" in result.output
    assert not (tmp_path / "proximity-sync.db").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("notaurl", "DATABASE_URL is invalid: is not a database URL"),
        ("mysql://sync@127.0.0.1/db", "only sqlite and postgresql are supported"),
    ],
)
def test_bad_database_url_is_one_sentence(runner, url, expected):
    result = runner.invoke(main, ["deliveries"], env={"DATABASE_URL": url})

    assert result.exit_code == 1
    assert expected in result.output
    assert "Traceback" not in result.output
    assert url not in result.output


def test_database_password_never_echoed(runner):
    result = runner.invoke(main, ["deliveries"], env={"DATABASE_URL": "mysql://sync:hunter2@127.0.0.1/db"})

    assert result.exit_code == 1
    assert "hunter2" not in result.output


def test_serve_port_out_of_range_is_usage_error(runner):
    result = runner.invoke(main, ["serve", "--port", "80000"])

    assert result.exit_code == 2
    assert "Invalid value for '--port': 80000 is not in the range 0<=x<=65535." in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "command", [["serve"], ["worker"], ["deliveries"], ["db", "current"], ["db", "upgrade"], ["reconcile"]]
)
def test_non_sqlite_file_is_one_sentence(runner, tmp_path, command):
    path = (tmp_path / "garbage.db").resolve()
    path.write_text("garbage\n")

    result = runner.invoke(main, command, env={"DATABASE_URL": f"sqlite:///{path}"})

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert error_lines == [
        f"Error: DATABASE_URL sqlite:///{path} names {path}, which is not a SQLite database; "
        f"point DATABASE_URL at the connector's database, or move {path} away so that the connector creates a new one"
    ]
    assert "Traceback" not in result.output
    assert "sqlalche.me" not in result.output
    assert path.read_text() == "garbage\n"


def test_database_error_hides_password():
    url = "postgresql+psycopg://sync:hunter2@127.0.0.1:5432/test"
    error = DBAPIError("SELECT 1", {}, Exception("authentication with password hunter2 failed"))

    problem, remedy = explain_database_error(url, error)

    assert problem == (
        "the database postgresql+psycopg://sync:***@127.0.0.1:5432/test cannot be used: "
        "authentication with password *** failed"
    )
    assert "hunter2" not in remedy


def test_missing_mappings_dir_named(runner, tmp_path):
    absent = tmp_path / "nowhere"

    result = runner.invoke(main, ["deliveries"], env={"MAPPINGS_DIR": str(absent)})

    assert result.exit_code == 1
    assert f"MAPPINGS_DIR {absent} is not a folder" in result.output


def test_settings_lists_every_setting(runner):
    result = runner.invoke(main, ["settings"])

    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert f"\n{name.upper()}: " in "\n" + result.output
    assert "WORKER_THREADS: 12 (default)\n    Bookings synced in parallel by one worker" in result.output
    assert "PROXIMITY_WEBHOOK_SECRET: not set (default)" in result.output


def test_settings_shows_values_in_use(runner, tmp_path):
    (tmp_path / ".env").write_text("LOG_LEVEL=debug\n")
    env = {
        "WORKER_THREADS": "8",
        "PROXIMITY_WEBHOOK_SECRET": "whsec_first,whsec_second",
        "DATABASE_URL": "postgresql+psycopg://sync:hunter2@127.0.0.1:5432/test",
    }

    result = runner.invoke(main, ["settings"], env=env)

    assert result.exit_code == 0
    assert "WORKER_THREADS: 8 (default 12)" in result.output
    assert "LOG_LEVEL: DEBUG (default INFO)" in result.output
    assert "PROXIMITY_WEBHOOK_SECRET: 2 secrets, not shown (default not set)" in result.output
    assert "DATABASE_URL: postgresql+psycopg://sync:***@127.0.0.1:5432/test" in result.output
    assert "whsec_first" not in result.output
    assert "hunter2" not in result.output


def test_settings_names_backend_in_use(runner):
    unset = runner.invoke(main, ["settings"])
    chosen = runner.invoke(main, ["settings"], env={"CALENDAR_BACKEND": "ics"})

    assert unset.exit_code == 0
    assert "CALENDAR_BACKEND: not set, so ics is used (default)" in unset.output
    assert chosen.exit_code == 0
    assert "CALENDAR_BACKEND: ics (default not set)" in chosen.output


def test_settings_names_invalid_setting(runner):
    result = runner.invoke(main, ["settings"], env={"WORKER_THREADS": "many"})

    assert result.exit_code == 1
    assert "WORKER_THREADS" in result.output


def test_help_names_settings_command(runner):
    result = runner.invoke(main, ["--help"])

    assert result.exit_code == 0
    assert "proximity-sync settings" in result.output
    assert ".env" in result.output
