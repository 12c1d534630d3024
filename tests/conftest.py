"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RunningConnector, running_connector, test_settings

pytest_plugins = ["tests.emulator.fixtures"]


@pytest.fixture
def google_settings(tmp_path: Path, emulator, service_account_key):
    """Settings for a connector writing to the emulator through the real Google client."""
    return test_settings(
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
    with running_connector(test_settings(tmp_path)) as running:
        yield running
