"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    TEST_DATABASE,
    PostgresSchemas,
    RunningConnector,
    drop_abandoned_schemas,
    postgres_unreachable_reason,
    require_postgres,
    running_connector,
    connector_settings,
)

pytest_plugins = ["tests.emulator.fixtures"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once when PROXIMITY_TEST_DATABASE names a database the suite cannot use."""
    if TEST_DATABASE not in {"sqlite", "postgresql"}:
        pytest.exit(f"PROXIMITY_TEST_DATABASE must be sqlite or postgresql, not {TEST_DATABASE!r}", returncode=4)
    if TEST_DATABASE == "postgresql":
        reason = postgres_unreachable_reason()
        if reason is not None:
            pytest.exit(f"PROXIMITY_TEST_DATABASE=postgresql, but {reason}", returncode=4)
        drop_abandoned_schemas()


@pytest.fixture(autouse=True)
def postgres_schemas() -> Iterator[PostgresSchemas | None]:
    """With PROXIMITY_TEST_DATABASE=postgresql, the test's PostgreSQL schemas, dropped after it."""
    if TEST_DATABASE != "postgresql":
        yield None
        return

    schemas = PostgresSchemas()
    PostgresSchemas.current = schemas
    try:
        yield schemas
    finally:
        PostgresSchemas.current = None
        schemas.drop_all()


@pytest.fixture
def postgres(postgres_schemas: PostgresSchemas | None) -> Iterator[PostgresSchemas]:
    """PostgreSQL schemas for a test that needs PostgreSQL, regardless of PROXIMITY_TEST_DATABASE.

    The test is skipped when the server is unreachable, and fails instead in CI.
    """
    require_postgres()
    if postgres_schemas is not None:
        yield postgres_schemas
        return

    schemas = PostgresSchemas()
    try:
        yield schemas
    finally:
        schemas.drop_all()


@pytest.fixture
def google_settings(tmp_path: Path, emulator, service_account_key):
    """Settings for a connector writing to the emulator through the real Google client."""
    return connector_settings(
        tmp_path,
        calendar_backend="google",
        google_credentials_file=service_account_key,
        google_api_endpoint=emulator.api_endpoint,
    )


@pytest.fixture
def google_connector(google_settings) -> Iterator[RunningConnector]:
    """A running connector (receiver and worker) that writes to the emulator."""
    with running_connector(google_settings) as running:
        yield running


@pytest.fixture
def ics_connector(tmp_path: Path) -> Iterator[RunningConnector]:
    """A running connector on its embedded defaults: SQLite and the iCalendar feed."""
    with running_connector(connector_settings(tmp_path)) as running:
        yield running


class Mirror:
    """A running connector plus a read-only view of the calendars it writes, for either backend."""

    def __init__(self, running: RunningConnector, emulator=None) -> None:
        self.running = running
        self.emulator = emulator

    def __getattr__(self, name: str):
        return getattr(self.running, name)

    def events(self, calendar_id: str, include_deleted: bool = False) -> list[dict]:
        """Return the calendar's events as stored: live ones, or all with `include_deleted`."""
        if self.emulator is not None:
            return self.emulator.events(calendar_id, include_deleted=include_deleted)

        from connector.calendars.base import Target

        backend = self.running.connector.backend
        remote = backend.list_booking_events(Target(calendar_id), show_deleted=include_deleted)
        return [dict(event.body, id=event.event_id, status=event.status) for event in remote]


@pytest.fixture(params=["google", "ics"])
def mirror(request, tmp_path: Path) -> Iterator[Mirror]:
    """A running connector on each calendar backend in turn."""
    if request.param == "google":
        emulator = request.getfixturevalue("emulator")
        settings = request.getfixturevalue("google_settings")
        with running_connector(settings) as running:
            yield Mirror(running, emulator)
    else:
        with running_connector(connector_settings(tmp_path)) as running:
            yield Mirror(running)
