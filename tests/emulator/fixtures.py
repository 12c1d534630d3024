"""Pytest fixtures for the Calendar emulator. Load them with `pytest_plugins = ["tests.emulator.fixtures"]`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulator.emulator import CalendarEmulator


@pytest.fixture(scope="session")
def calendar_emulator() -> Iterator[CalendarEmulator]:
    """One started emulator for the whole test session."""
    emulator = CalendarEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def emulator(calendar_emulator: CalendarEmulator) -> CalendarEmulator:
    """The session's emulator, reset so that each test starts without calendars, events, faults or records."""
    calendar_emulator.reset()
    return calendar_emulator


@pytest.fixture
def service_account_key(emulator: CalendarEmulator, tmp_path: Path) -> Path:
    """Path to a new service-account key file with domain-wide delegation, registered with the emulator."""
    path = tmp_path / "service-account.json"
    emulator.make_service_account_key(path)
    return path
