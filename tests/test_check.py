"""`proximity-sync check` against the Calendar emulator, a real database and real mappings files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from connector.calendars.google_auth import SCOPE
from tests.emulator import DEFAULT_CLIENT_EMAIL
from tests.operator_support import invoke, keep_logging, settings_env  # noqa: F401
from tests.support import booking
from tests.support import connector_settings as make_settings

JANE = "jane@example.com"
OMAR = "omar@example.com"
TEAM = "team@example.com"

pytestmark = pytest.mark.usefixtures("keep_logging")


def google_env(tmp_path: Path, emulator, key: Path, **overrides: str) -> dict[str, str]:
    settings = make_settings(
        tmp_path,
        calendar_backend="google",
        google_credentials_file=key,
        google_api_endpoint=emulator.api_endpoint,
    )
    return settings_env(settings, **overrides)


def write_routing(tmp_path: Path, text: str) -> None:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "routing.toml").write_text(text)


def lines(result) -> list[str]:
    return result.stdout.splitlines()


def line_starting(result, prefix: str) -> str:
    matching = [line for line in lines(result) if line.startswith(prefix)]
    assert len(matching) == 1, result.stdout
    return matching[0]


def fix_after(result, prefix: str) -> str:
    output = lines(result)
    index = output.index(line_starting(result, prefix))
    assert output[index + 1].startswith("    fix: "), result.stdout
    return output[index + 1]


def test_check_passes_for_working_setup(tmp_path, emulator, service_account_key):
    emulator.add_calendar(TEAM, owner=OMAR, shared_with=[JANE])
    write_routing(tmp_path, f'[[route]]\nevent_type_slug = "30min-call"\ncalendar_id = "{TEAM}"\nacting_user = "{JANE}"\n')

    result = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 0, result.stdout
    assert "✓ settings: valid; calendar backend google" in lines(result)
    assert "✓ PROXIMITY_WEBHOOK_SECRET: set (1 secret)" in lines(result)
    assert "✓ mappings folder" in line_starting(result, "✓ mappings folder")
    assert "1 routing rule" in line_starting(result, "✓ mappings folder")
    assert DEFAULT_CLIENT_EMAIL in line_starting(result, "✓ credentials file")
    assert line_starting(result, f"✓ access token for {JANE}").endswith("issued")
    assert line_starting(result, f"✓ calendar {TEAM} (routing rule 1)").endswith(f"readable as {JANE}")
    assert line_starting(result, f"✓ calendar {JANE} (--host {JANE})").endswith(f"readable as {JANE}")
    assert not any(line.startswith("✗") for line in lines(result))
    assert lines(result)[-1].startswith("All ")


def test_check_warns_of_unknown_dotenv_key(tmp_path, emulator, service_account_key, caplog):
    env = google_env(tmp_path, emulator, service_account_key)
    (tmp_path / ".env").write_text("WORKER_THREAD=4\n")

    with caplog.at_level(logging.WARNING, logger="connector.settings"):
        result = invoke(["check", "--host", JANE], env)

    dotenv = tmp_path / ".env"
    assert result.exit_code == 0, result.stdout
    assert "✓ settings: valid; calendar backend google" in lines(result)
    warning = line_starting(result, f"! env file {dotenv}")
    assert warning == f"! env file {dotenv}: WORKER_THREAD is not a setting of the connector, so it is ignored"
    assert fix_after(result, "! env file") == "    fix: did you mean WORKER_THREADS?"
    assert lines(result)[-1].endswith("checks passed, with 1 warning.")
    assert [record.getMessage() for record in caplog.records if record.name == "connector.settings"] == []


def test_check_makes_only_reads(tmp_path, emulator, service_account_key):
    result = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 0, result.stdout
    assert emulator.requests
    assert {request.method for request in emulator.requests} == {"GET"}
    assert emulator.events(JANE, include_deleted=True) == []


def test_check_names_missing_delegation(tmp_path, emulator):
    key = tmp_path / "no-delegation.json"
    document = emulator.make_service_account_key(key, client_email="nodelegation@proximity-test.iam.gserviceaccount.com", delegation=False)

    result = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, key))

    assert result.exit_code == 1
    token_line = line_starting(result, f"✗ access token for {JANE}")
    assert "domain-wide delegation is missing" in token_line
    fix = fix_after(result, f"✗ access token for {JANE}")
    assert document["client_id"] in fix
    assert SCOPE in fix
    assert "Domain-wide delegation" in fix
    calendar_line = line_starting(result, f"✗ calendar {JANE}")
    assert f"{JANE} has no access token" in calendar_line
    assert lines(result)[-1].endswith("checks failed.")


def test_check_reports_calendar_not_shared(tmp_path, emulator, service_account_key):
    emulator.add_calendar(TEAM, owner=OMAR)
    write_routing(tmp_path, f'[[route]]\nhost_email = "{JANE}"\ncalendar_id = "{TEAM}"\n')

    result = invoke(["check"], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 1
    assert f"not found, or not shared with {JANE}" in line_starting(result, f"✗ calendar {TEAM} (routing rule 1)")
    fix = fix_after(result, f"✗ calendar {TEAM}")
    assert f"share the calendar with {JANE}" in fix
    assert DEFAULT_CLIENT_EMAIL in fix


def test_check_reports_missing_host_calendar(tmp_path, emulator, service_account_key):
    emulator.auto_user_calendars = False

    result = invoke(["check", "--host", OMAR], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 1
    assert line_starting(result, f"✓ access token for {OMAR}").endswith("issued")
    assert f"not found, or not shared with {OMAR}" in line_starting(result, f"✗ calendar {OMAR}")


def test_check_reports_malformed_mappings(tmp_path, emulator, service_account_key):
    write_routing(tmp_path, '[[route]]\nevent_type_slug = "demo"\n')

    result = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 1
    assert line_starting(result, f"✓ calendar {JANE} (--host {JANE})").endswith(f"readable as {JANE}")
    mappings_line = line_starting(result, "✗ mappings folder")
    assert "routing.toml, line 1" in mappings_line
    assert "calendar_id" in mappings_line
    assert "mappings/README.md" in fix_after(result, "✗ mappings folder")


def test_check_mappings_fix_names_line(tmp_path, emulator, service_account_key):
    write_routing(tmp_path, '[[route]]\nevent_type_slug = "demo"\n')

    result = invoke(["check"], google_env(tmp_path, emulator, service_account_key))

    fix = fix_after(result, "✗ mappings folder")
    assert fix == "    fix: correct the file at the line named; mappings/README.md describes every key"


def write_extra_toml(folder: Path) -> Path:
    (folder / "routes.toml").write_text("", encoding="utf-8")
    return folder / "routes.toml"


def write_non_utf8_routing(folder: Path) -> Path:
    (folder / "routing.toml").write_bytes(b"# caf\xe9\n")
    return folder / "routing.toml"


def make_routing_folder(folder: Path) -> Path:
    (folder / "routing.toml").mkdir()
    return folder / "routing.toml"


@pytest.mark.parametrize("make_problem", [write_extra_toml, write_non_utf8_routing, make_routing_folder])
def test_check_mappings_fix_without_line(tmp_path, emulator, service_account_key, make_problem):
    folder = tmp_path / "mappings"
    folder.mkdir()
    path = make_problem(folder)

    result = invoke(["check"], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 1
    assert f"{path}: " in line_starting(result, "✗ mappings folder")
    assert ", line " not in line_starting(result, "✗ mappings folder")
    fix = fix_after(result, "✗ mappings folder")
    assert "at the line named" not in fix
    assert fix == (
        f"    fix: correct, rename or remove {path} as the problem says; mappings/README.md describes "
        "the files the folder may contain and their keys"
    )


def test_check_reports_invalid_toml(tmp_path, emulator, service_account_key):
    write_routing(tmp_path, "[[route]\n")

    result = invoke(["check"], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 1
    assert "routing.toml" in line_starting(result, "✗ mappings folder")


def test_check_reports_empty_secret(tmp_path, emulator, service_account_key):
    env = google_env(tmp_path, emulator, service_account_key, PROXIMITY_WEBHOOK_SECRET="")

    result = invoke(["check", "--host", JANE], env)

    assert result.exit_code == 1
    assert "every delivery is rejected with 401" in line_starting(result, "✗ PROXIMITY_WEBHOOK_SECRET")
    assert "Proximity dashboard" in fix_after(result, "✗ PROXIMITY_WEBHOOK_SECRET")


def test_check_reports_unusable_key_file(tmp_path, emulator):
    key = tmp_path / "key.json"
    key.write_text("this is not a key")

    result = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, key))

    assert result.exit_code == 1
    assert "is not valid JSON" in line_starting(result, f"✗ credentials file {key}")
    assert "GOOGLE_CREDENTIALS_FILE" in fix_after(result, "✗ credentials file")
    assert emulator.requests == []


def test_check_reports_invalid_setting(tmp_path, emulator, service_account_key):
    env = google_env(tmp_path, emulator, service_account_key, WORKER_THREADS="0")

    result = invoke(["check"], env)

    assert result.exit_code == 1
    assert "WORKER_THREADS is invalid" in line_starting(result, "✗ settings")
    assert len([line for line in lines(result) if line[:1] in "✓✗-"]) == 1


def test_check_reports_unwritable_database_folder(tmp_path, emulator, service_account_key):
    env = google_env(tmp_path, emulator, service_account_key, DATABASE_URL=f"sqlite:///{tmp_path / 'absent' / 'sync.db'}")

    result = invoke(["check", "--host", JANE], env)

    assert result.exit_code == 1
    assert "does not exist or is not writable" in line_starting(result, "✗ database")



def test_check_reports_non_sqlite_file(tmp_path, emulator, service_account_key):
    path = (tmp_path / "garbage.db").resolve()
    path.write_text("garbage\n")
    env = google_env(tmp_path, emulator, service_account_key, DATABASE_URL=f"sqlite:///{path}")

    result = invoke(["check", "--host", JANE], env)

    assert result.exit_code == 1
    assert line_starting(result, "✗ database") == (
        f"✗ database sqlite:///{path}: DATABASE_URL sqlite:///{path} names {path}, which is not a SQLite database"
    )
    assert fix_after(result, "✗ database") == (
        f"    fix: point DATABASE_URL at the connector's database, or move {path} away so that the connector creates a new one"
    )
    assert "sqlalche.me" not in result.output


def test_check_reports_invalid_database_url(tmp_path, emulator, service_account_key):
    env = google_env(tmp_path, emulator, service_account_key, DATABASE_URL="not a url")

    result = invoke(["check", "--host", JANE], env)

    assert result.exit_code == 1
    assert "DATABASE_URL is invalid: is not a database URL" in line_starting(result, "✗ settings")
    assert "not a url" not in result.output


def test_check_reads_hosts_from_mapping_table(tmp_path, emulator, service_account_key, google_connector):
    google_connector.deliver("booking.created", booking(hostEmail=OMAR))
    google_connector.wait_idle()
    env = settings_env(google_connector.connector.settings)

    result = invoke(["check"], env)

    assert result.exit_code == 0, result.stdout
    assert line_starting(result, f"✓ calendar {OMAR} (mapping table)").endswith(f"readable as {OMAR}")
    assert "1 deliveries pending" not in line_starting(result, "✓ database")
    assert "0 deliveries pending, 0 failed" in line_starting(result, "✓ database")


def test_check_without_calendars_asks_for_host(tmp_path, emulator, service_account_key):
    result = invoke(["check"], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 0, result.stdout
    assert "run check --host EMAIL" in line_starting(result, "- calendars")
    assert line_starting(result, f"✓ access token for {DEFAULT_CLIENT_EMAIL}").endswith("issued")


def test_check_skips_rule_written_by_each_host(tmp_path, emulator, service_account_key):
    write_routing(tmp_path, f'[[route]]\nevent_type_slug = "demo"\ncalendar_id = "{TEAM}"\n')
    emulator.add_calendar(TEAM, owner=OMAR, shared_with=[JANE])

    without_host = invoke(["check"], google_env(tmp_path, emulator, service_account_key))
    with_host = invoke(["check", "--host", JANE], google_env(tmp_path, emulator, service_account_key))

    assert "each booking's host writes it" in line_starting(without_host, f"- calendar {TEAM} (routing rule 1)")
    assert with_host.exit_code == 0, with_host.stdout
    assert line_starting(with_host, f"✓ calendar {TEAM} (routing rule 1 as {JANE})").endswith(f"readable as {JANE}")


def test_check_skips_google_for_ics(tmp_path, emulator):
    env = settings_env(make_settings(tmp_path))

    result = invoke(["check"], env)

    assert result.exit_code == 0, result.stdout
    assert "calendar backend is ics" in line_starting(result, "- Google Calendar")
    assert emulator.requests == []


def test_check_prints_json(tmp_path, emulator, service_account_key):
    env = google_env(tmp_path, emulator, service_account_key, PROXIMITY_WEBHOOK_SECRET="")

    result = invoke(["check", "--json", "--host", JANE], env)

    assert result.exit_code == 1
    results = json.loads(result.stdout)
    by_item = {entry["item"]: entry for entry in results}
    assert by_item["PROXIMITY_WEBHOOK_SECRET"]["status"] == "failed"
    assert "Proximity dashboard" in by_item["PROXIMITY_WEBHOOK_SECRET"]["fix"]
    assert by_item["settings"]["status"] == "ok"
    assert by_item[f"calendar {JANE} (--host {JANE})"]["status"] == "ok"


def test_check_rejects_host_without_at(tmp_path, emulator, service_account_key):
    result = invoke(["check", "--host", "jane"], google_env(tmp_path, emulator, service_account_key))

    assert result.exit_code == 2
    assert "not an email address" in result.stderr
