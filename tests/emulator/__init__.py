"""An in-process emulator of the Google Calendar v3 API and Google's OAuth token endpoint, for tests."""

from tests.emulator.app import RecordedRequest
from tests.emulator.emulator import DEFAULT_CLIENT_EMAIL, CalendarEmulator
from tests.emulator.errors import ApiError
from tests.emulator.faults import Fault
from tests.emulator.tokens import TokenRequest

__all__ = [
    "DEFAULT_CLIENT_EMAIL",
    "ApiError",
    "CalendarEmulator",
    "Fault",
    "RecordedRequest",
    "TokenRequest",
]
