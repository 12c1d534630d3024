"""Settings, read once from the environment and from a `.env` file.

Each setting is declared here with its type, default and a one-line description; `.env.example`
repeats the same list for operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GOOGLE_API_ENDPOINT = "https://www.googleapis.com/calendar/v3/"


class SettingsError(Exception):
    """A setting is missing or invalid. The message names the setting and the expected value."""


class Settings(BaseSettings):
    """Everything an operator can configure."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

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
        description="Base URL the connector is reached at, used to print iCalendar feed URLs.",
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
    def webhook_secrets(self) -> list[str]:
        """Return the configured secrets, rotation order kept, blanks dropped."""
        return split_secrets(self.proximity_webhook_secret)

    @property
    def backend_name(self) -> str:
        """Return the calendar backend in use, applying the default."""
        if self.calendar_backend:
            return self.calendar_backend
        return "google" if self.google_credentials_file else "ics"


def split_secrets(text: str) -> list[str]:
    """Return the comma-separated webhook secrets of `text`, in order, without blanks."""
    return [secret.strip() for secret in text.split(",") if secret.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one sentence per bad setting."""
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe_validation_error(error)) from None

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
