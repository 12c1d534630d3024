"""Settings: defaults, validation messages, and the documentation that lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from connector.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = [name.upper() for name in Settings.model_fields]


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_env_example_lists_setting(name):
    assert f"{name}=" in (ROOT / ".env.example").read_text()


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_readme_lists_setting(name):
    assert f"`{name}`" in (ROOT / "README.md").read_text()


NUMERIC_SETTINGS = [name for name, field in Settings.model_fields.items() if type(field.default) in (int, float)]


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_documented_default_matches_setting(name):
    default = Settings.model_fields[name].default
    readme_row = re.search(rf"^\| `{name.upper()}` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.M)
    env_line = re.search(rf"^{name.upper()}=(.*)$", (ROOT / ".env.example").read_text(), re.M)

    assert readme_row is not None
    assert float(readme_row[1]) == default
    assert env_line is not None
    assert float(env_line[1]) == default


def test_secrets_split_on_commas(monkeypatch):
    monkeypatch.setenv("PROXIMITY_WEBHOOK_SECRET", " old-secret , new-secret ,")

    settings = load_settings(_env_file=None)

    assert settings.webhook_secrets == ["old-secret", "new-secret"]


def test_backend_defaults_to_ics(monkeypatch):
    monkeypatch.delenv("GOOGLE_CREDENTIALS_FILE", raising=False)
    monkeypatch.delenv("CALENDAR_BACKEND", raising=False)

    assert load_settings(_env_file=None).backend_name == "ics"


def test_backend_defaults_to_google_with_credentials(monkeypatch, tmp_path):
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("GOOGLE_CREDENTIALS_FILE", str(key))
    monkeypatch.delenv("CALENDAR_BACKEND", raising=False)

    assert load_settings(_env_file=None).backend_name == "google"


def test_invalid_number_names_setting(monkeypatch):
    monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", "-5")

    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)

    assert str(raised.value).startswith("WEBHOOK_MAX_BODY_BYTES is invalid (got '-5')")


def test_secret_value_never_echoed(monkeypatch):
    monkeypatch.setenv("PROXIMITY_WEBHOOK_SECRET", "topsecret")
    monkeypatch.setenv("LOG_LEVEL", "LOUD")

    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)

    assert "LOG_LEVEL" in str(raised.value)
    assert "topsecret" not in str(raised.value)


def test_missing_credentials_file_named(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_CREDENTIALS_FILE", str(tmp_path / "absent.json"))

    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)

    assert "absent.json" in str(raised.value)
    assert "GOOGLE_CREDENTIALS_FILE" in str(raised.value)


def test_dotenv_file_read(monkeypatch, tmp_path):
    monkeypatch.delenv("PROXIMITY_WEBHOOK_SECRET", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("PROXIMITY_WEBHOOK_SECRET=from-dotenv\n")

    assert load_settings(_env_file=dotenv).webhook_secrets == ["from-dotenv"]


def test_public_url_must_be_http(monkeypatch):
    monkeypatch.setenv("PUBLIC_URL", "not a url")

    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)

    assert "PUBLIC_URL is invalid" in str(raised.value)


def test_public_url_trailing_slash_dropped(monkeypatch):
    monkeypatch.setenv("PUBLIC_URL", "https://sync.example.com/")

    assert load_settings(_env_file=None).public_url == "https://sync.example.com"


def test_dotenv_unknown_keys_reported(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WORKER_THREADS", raising=False)
    monkeypatch.delenv("PROXIMITY_WEBHOOK_SECRET", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("PROXIMITY_WEBHOOK_SECRETS=abc\nWORKER_THREAD=4\nCOMPOSE_PROJECT_NAME=sync\n")

    settings = load_settings(_env_file=dotenv)

    problems = [str(problem) for problem in settings.env_file_problems]
    assert problems == [
        f"{dotenv}: COMPOSE_PROJECT_NAME is not a setting of the connector, so it is ignored; "
        "`proximity-sync settings` lists every setting",
        f"{dotenv}: PROXIMITY_WEBHOOK_SECRETS is not a setting of the connector, so it is ignored; "
        "did you mean PROXIMITY_WEBHOOK_SECRET?",
        f"{dotenv}: WORKER_THREAD is not a setting of the connector, so it is ignored; did you mean WORKER_THREADS?",
    ]
    assert [record.getMessage() for record in caplog.records if record.name == "connector.settings"] == problems
    assert settings.worker_threads == 12
    assert settings.webhook_secrets == []
    assert settings.model_extra == {}
    assert not any("abc" in problem for problem in problems)


def test_environment_unknown_variable_ignored(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WORKER_THREAD", "4")
    dotenv = tmp_path / ".env"
    dotenv.write_text("WORKER_THREADS=3\n")

    settings = load_settings(_env_file=dotenv)

    assert settings.worker_threads == 3
    assert settings.env_file_problems == []
    assert [record for record in caplog.records if record.name == "connector.settings"] == []


def test_dotenv_unparseable_line_names_file(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("export the secret\nLOG_LEVEL=DEBUG\n")

    settings = load_settings(_env_file=dotenv)

    problems = [str(problem) for problem in settings.env_file_problems]
    assert problems == [
        f"{dotenv}: the statement starting at line 1 could not be parsed, so it is ignored; "
        "write it as NAME=value, quote a value with spaces, or start a comment with #",
    ]
    assert settings.log_level == "DEBUG"
    assert [record.getMessage() for record in caplog.records] == problems


def test_dotenv_unparseable_line_logged_on_error(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WORKER_THREADS", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("not a line\nWORKER_THREADS=many\n")

    with pytest.raises(SettingsError):
        load_settings(_env_file=dotenv)

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"{dotenv}: the statement starting at line 1 could not be parsed, so it is ignored; "
        "write it as NAME=value, quote a value with spaces, or start a comment with #",
    ]
