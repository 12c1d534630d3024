"""The Calendar emulator of the test suite, with the arrival time of every API request recorded.

The emulator records a request when it responds, after its added latency, and without a time.
The bench needs when each request arrived and for which booking, so it wraps the emulator's
ASGI app in `ArrivalRecorder`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from connector.calendars.base import BOOKING_ID_PROPERTY
from tests.emulator import CalendarEmulator

API_PREFIX = "/calendar/v3/calendars/"


@dataclass(frozen=True)
class Arrival:
    """One Calendar API request as it reached the emulator, timed with `time.monotonic()`.

    `event_id` comes from the path, or from the body of an insert. `booking_id` is read from
    the body's extended properties of an insert or patch, when the body names it.
    """

    at: float
    method: str
    calendar_id: str
    event_id: str | None
    booking_id: str | None


class ArrivalRecorder:
    """ASGI middleware that records an `Arrival` before the wrapped app handles the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self.listener: Callable[[Arrival], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return

        arrived = time.monotonic()
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break

        arrival = _describe(arrived, scope, body)
        with self._lock:
            self._arrivals.append(arrival)
        if self.listener is not None:
            self.listener(arrival)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def arrivals(self) -> list[Arrival]:
        """Return a copy of the arrivals so far, oldest first."""
        with self._lock:
            return list(self._arrivals)

    def clear(self) -> None:
        """Forget the recorded arrivals."""
        with self._lock:
            self._arrivals.clear()


def _describe(arrived: float, scope: Scope, body: bytes) -> Arrival:
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?", 1)[0]
    segments = [unquote(segment) for segment in raw_path[len(API_PREFIX):].split("/")]
    method = scope["method"]
    headers = dict(scope.get("headers") or [])
    method = headers.get(b"x-http-method-override", method.encode()).decode().upper()

    calendar_id = segments[0]
    event_id = segments[2] if len(segments) > 2 and segments[2] else None
    booking_id = None
    if body and method in ("POST", "PATCH", "PUT"):
        try:
            document = json.loads(body)
        except ValueError:
            document = {}
        if isinstance(document, dict):
            event_id = event_id or document.get("id")
            private = (document.get("extendedProperties") or {}).get("private") or {}
            booking_id = private.get(BOOKING_ID_PROPERTY)
    return Arrival(arrived, method, calendar_id, event_id, booking_id)


class RecordingEmulator:
    """A started `CalendarEmulator` whose API requests are also recorded with their arrival time."""

    def __init__(self, workdir: Path, latency: float = 0.0) -> None:
        self.emulator = CalendarEmulator()
        # NOTE: the emulator has no public hook for middleware, so the recorder replaces the app
        # its background server runs; tests/emulator/server.py keeps the app in `_app`.
        self.recorder = ArrivalRecorder(self.emulator._server._app)
        self.emulator._server._app = self.recorder
        self.emulator.start()
        self.emulator.latency = latency
        self.key_file = workdir / "service-account.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.emulator.make_service_account_key(self.key_file)

    def connector_settings(self) -> dict[str, str]:
        """Return the environment that points `serve` at this emulator."""
        return {
            "CALENDAR_BACKEND": "google",
            "GOOGLE_CREDENTIALS_FILE": str(self.key_file),
            "GOOGLE_API_ENDPOINT": self.emulator.api_endpoint,
        }

    def stop(self) -> None:
        """Stop the emulator's server."""
        self.emulator.stop()

    def __enter__(self) -> RecordingEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
