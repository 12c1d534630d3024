"""Settings, read once from the environment and from a `.env` file.

Each setting is declared here with its type, default and a one-line description; `.env.example`
repeats the same list for operators.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

DEFAULT_GOOGLE_API_ENDPOINT = "https://www.googleapis.com/calendar/v3/"
ENV_FILE = Path(".env")

# python-dotenv (1.x) logs each line it cannot parse on this logger, without naming the file.
DOTENV_LOGGER = "dotenv.main"


class SettingsError(Exception):
    """A setting is missing or invalid. The message names the setting and the expected value."""


class Settings(BaseSettings):
    """Everything an operator can configure."""

    # With extra="allow", pydantic-settings keeps the keys of the .env file that name no setting in
    # `model_extra`, so `load_settings` can report them. Unknown variables of the process
    # environment are never read, because other programs share them.
    model_config = SettingsConfigDict(env_file=ENV_FILE, env_file_encoding="utf-8", extra="allow")

    _env_file_problems: list[EnvFileProblem] = PrivateAttr(default_factory=list)

    proximity_webhook_secret: str = Field(
        default="",
        description="Webhook secret from the Proximity dashboard; several, comma-separated, are all accepted.",
    )
    database_url: str = Field(
        default="sqlite:///proximity-sync.db",
        description="SQLAlchemy database URL: SQLite (default, a file in the working folder) or PostgreSQL.",
    )
    calendar_backend: Literal["google", "ics"] | None = Field(
        default=None,
        description="Calendar to write to: google or ics; default google when GOOGLE_CREDENTIALS_FILE is set, else ics.",
    )
    google_credentials_file: Path | None = Field(
        default=None,
        description="Service-account key (domain-wide delegation) or authorized-user JSON file.",
    )
    google_api_endpoint: str = Field(
        default=DEFAULT_GOOGLE_API_ENDPOINT,
        description="Calendar API base URL, ending in /calendar/v3/.",
    )
    mappings_dir: Path = Field(default=Path("mappings"), description="Folder holding routing.toml and templates.toml.")
    webhook_max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest accepted webhook body, in bytes.")
    public_url: str | None = Field(
        default=None,
        description="Base URL the connector is reached at, used to print feed and webhook URLs and as the default target of send-test.",
    )
    # With 8 threads, project slots went unused while a backlog of new bookings was synced (159.9
    # against 166.0 changes/s with 12), measured before the dispatcher learned a new booking's host
    # from its routing.
    worker_threads: int = Field(default=12, ge=1, le=128, description="Bookings synced in parallel by one worker, each by a thread of its own.")
    worker_poll_seconds: float = Field(default=0.5, gt=0, description="How often an idle worker looks for new work.")
    lease_seconds: float = Field(default=120.0, gt=0, description="How long a worker owns a booking before others may take it over.")
    delivery_retry_base_seconds: float = Field(default=30.0, gt=0, description="First delay before a failed delivery is retried.")
    delivery_retry_max_seconds: float = Field(default=900.0, gt=0, description="Longest delay between two attempts of a delivery.")
    delivery_max_attempts: int = Field(default=14, ge=1, description="Attempts before a delivery that keeps failing is marked failed.")
    payload_retention_days: float = Field(default=7.0, ge=0, description="Days a finished delivery keeps its raw payload (invitee details) before it is cleared.")
    delivery_retention_days: float = Field(default=30.0, ge=1, description="Days a finished delivery's id and body digest are kept to recognise retries and replays.")
    prune_interval_seconds: float = Field(default=3600.0, ge=0, description="How often the worker prunes old payloads and deliveries; 0 leaves it to `proximity-sync prune`.")
    call_max_attempts: int = Field(default=5, ge=1, description="Attempts of one calendar call within a delivery attempt.")
    call_timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout, in seconds, of each phase (connect, read, write) of a calendar API request.")
    google_user_requests_per_minute: int = Field(default=600, gt=0, description="Calendar API requests per minute allowed per acting user: the host, or the route's acting_user.")
    google_project_requests_per_minute: int = Field(default=10000, gt=0, description="Calendar API requests per minute for the whole project.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log line format: text, or json for one JSON object per line with the delivery, booking and calendar as fields.",
    )
    ready_stall_seconds: float = Field(
        default=300.0,
        ge=0,
        description="GET /readyz responds with 503 when a delivery has been due this long, in seconds, and none finished meanwhile; 0 turns this check off.",
    )

    @field_validator("google_api_endpoint")
    @classmethod
    def _endpoint_ends_with_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value if value.endswith("/") else value + "/"

    @field_validator("log_format", mode="before")
    @classmethod
    def _lowercase_log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")) or " " in value:
            raise ValueError("must be an http:// or https:// URL, such as https://sync.example.com")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL; use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB") from None
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError(f"names {url.get_backend_name()!r}; only sqlite and postgresql are supported")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @property
    def env_file_problems(self) -> list[EnvFileProblem]:
        """Return the lines of the .env file that were ignored: unknown settings and unparseable lines."""
        return list(self._env_file_problems)

    @property
    def webhook_secrets(self) -> list[str]:
        """Return the configured secrets, rotation order kept, blanks dropped."""
        return split_secrets(self.proximity_webhook_secret)

    @property
    def backend_name(self) -> str:
        """Return the calendar backend in use, applying the default."""
        if self.calendar_backend:
            return self.calendar_backend
        return "google" if self.google_credentials_file else "ics"


@dataclass(frozen=True)
class EnvFileProblem:
    """A line of the .env file that the connector ignored, with what is wrong and how to fix it."""

    path: Path
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.fix}"


def split_secrets(text: str) -> list[str]:
    """Return the comma-separated webhook secrets of `text`, in order, without blanks."""
    return [secret.strip() for secret in text.split(",") if secret.strip()]


def load_settings(*, log_env_file_problems: bool = True, **overrides: object) -> Settings:
    """Read the settings, turning validation errors into one sentence per bad setting.

    Logs a warning for each ignored line of the .env file, which `Settings.env_file_problems` also
    returns. A caller that reports those problems itself passes `log_env_file_problems=False`; they
    are still logged when a setting is invalid, because no `Settings` then carries them.
    """
    env_file = _env_file_path(overrides.get("_env_file", ENV_FILE))
    with _unparseable_env_lines(env_file) as problems:
        try:
            settings = Settings(**overrides)
        except ValidationError as error:
            _log_env_file_problems(problems)
            raise SettingsError(_describe_validation_error(error)) from None

    problems += _unknown_env_keys(env_file, settings, overrides)
    settings._env_file_problems = problems
    if log_env_file_problems:
        _log_env_file_problems(problems)

    if settings.backend_name == "google" and not settings.google_credentials_file:
        raise SettingsError(
            "GOOGLE_CREDENTIALS_FILE is not set, but CALENDAR_BACKEND is google: "
            "set it to a service-account key or authorized-user JSON file."
        )
    if "mappings_dir" in settings.model_fields_set and not settings.mappings_dir.is_dir():
        raise SettingsError(
            f"MAPPINGS_DIR {settings.mappings_dir} is not a folder; create it, or unset MAPPINGS_DIR to use ./mappings."
        )
    if settings.google_credentials_file and not settings.google_credentials_file.is_file():
        raise SettingsError(
            f"GOOGLE_CREDENTIALS_FILE {settings.google_credentials_file} does not exist or is not a file."
        )
    return settings


def _env_file_path(env_file: object) -> Path:
    """Return the absolute path of the .env file that problems name; `_env_file` may override it."""
    if isinstance(env_file, str | Path):
        return Path(env_file).resolve()
    return ENV_FILE.resolve()


def _log_env_file_problems(problems: list[EnvFileProblem]) -> None:
    # Callers usually configure logging after reading the settings, so these lines may reach
    # stderr through Python's last-resort handler, as plain text whatever LOG_FORMAT sets.
    for problem in problems:
        log.warning("%s", problem)


@contextmanager
def _unparseable_env_lines(env_file: Path) -> Iterator[list[EnvFileProblem]]:
    """Collect python-dotenv's warnings about unparseable lines as problems that name the file.

    Its own log records are dropped meanwhile, because they name the line but not the file, and
    `load_settings` logs each problem again with the file.
    """
    problems: list[EnvFileProblem] = []

    def collect(record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("python-dotenv could not parse"):
            return True
        line = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        problems.append(EnvFileProblem(
            env_file,
            f"the statement starting at line {line} could not be parsed, so it is ignored",
            "write it as NAME=value, quote a value with spaces, or start a comment with #",
        ))
        return False

    dotenv_logger = logging.getLogger(DOTENV_LOGGER)
    dotenv_logger.addFilter(collect)
    try:
        yield problems
    finally:
        dotenv_logger.removeFilter(collect)


def _unknown_env_keys(env_file: Path, settings: Settings, overrides: dict[str, object]) -> list[EnvFileProblem]:
    """Return a problem for each .env key that names no setting, and drop those keys from `settings`.

    pydantic-settings reads names case-insensitively and stores them lowercased, so the problems
    name them in upper case, as the settings are documented.
    """
    extra = settings.model_extra or {}
    known = [name.upper() for name in Settings.model_fields]
    problems = []
    for key in sorted(extra):
        if key in overrides:
            continue
        name = key.upper()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        fix = f"did you mean {close[0]}?" if close else "`proximity-sync settings` lists every setting"
        problems.append(EnvFileProblem(env_file, f"{name} is not a setting of the connector, so it is ignored", fix))
    extra.clear()
    return problems


def _describe_validation_error(error: ValidationError) -> str:
    sentences = []
    for problem in error.errors():
        name = "_".join(str(part) for part in problem["loc"]).upper() or "settings"
        value = problem.get("input")
        hidden = name in {"PROXIMITY_WEBHOOK_SECRET", "DATABASE_URL"} or isinstance(value, dict) or value is None
        shown = "" if hidden else f" (got {value!r})"
        message = problem["msg"].removeprefix("Value error, ")
        sentences.append(f"{name} is invalid{shown}: {message}.")
    return " ".join(sentences)
