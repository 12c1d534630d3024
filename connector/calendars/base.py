"""The interface every calendar backend implements, and the errors it raises.

Event bodies travel as dictionaries in the Google Calendar v3 event shape (`summary`,
`description`, `location`, `start`, `end`, `status`, `transparency`, `colorId`,
`extendedProperties`), because that shape is the richest of the calendars we write to and
the embedded feed can render it directly.

Error hierarchy::

    CalendarError
    ├── TransientCalendarError      retry later: 429, 5xx, rate-limit 403s, timeouts
    │   └── RateLimitedError        the calendar asked us to slow down
    ├── PermanentCalendarError      retrying the same call cannot help
    │   └── CalendarNotFoundError   the calendar does not exist or is not shared with us
    ├── EventAlreadyExistsError     insert of an id that is taken (409)
    └── EventGoneError              the event was deleted or never existed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

BOOKING_ID_PROPERTY = "proximityBookingId"

EventBody = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """A calendar and the user whose credentials write to it."""

    calendar_id: str
    acting_user: str | None = None


@dataclass
class RemoteEvent:
    """An event as the calendar stores it."""

    event_id: str
    status: str
    body: EventBody = field(default_factory=dict)
    etag: str | None = None

    @property
    def is_live(self) -> bool:
        return self.status != "cancelled"

    @property
    def booking_id(self) -> str | None:
        private = self.body.get("extendedProperties", {}).get("private", {})
        return private.get(BOOKING_ID_PROPERTY)


class CalendarError(Exception):
    """A calendar call failed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        calendar_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.calendar_id = calendar_id

    def describe(self) -> str:
        """Return the error in words for an operator: status, reason, message and calendar."""
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.reason:
            parts.append(self.reason)
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.calendar_id:
            text += f" (calendar {self.calendar_id})"
        return text


class TransientCalendarError(CalendarError):
    """A failure that may pass: retry the call later."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimitedError(TransientCalendarError):
    """The calendar rejected the call because we are too fast or over quota."""


class PermanentCalendarError(CalendarError):
    """A failure that retrying the same call cannot fix."""


class CalendarNotFoundError(PermanentCalendarError):
    """The calendar does not exist, or the acting user cannot see it."""


class EventAlreadyExistsError(CalendarError):
    """An insert used an event id that the calendar already holds (Google's 409)."""


class EventGoneError(CalendarError):
    """The event was deleted, or never existed, so it cannot be changed."""


class CalendarBackend(Protocol):
    """What the sync worker needs from a calendar.

    Implementations must be safe to call from several worker threads at once.
    """

    name: str

    def insert_event(self, target: Target, event_id: str, body: EventBody) -> RemoteEvent:
        """Create an event with a caller-chosen id; raise EventAlreadyExistsError if taken."""
        ...

    def get_event(self, target: Target, event_id: str) -> RemoteEvent | None:
        """Fetch an event, cancelled ones included; None if the id was never used."""
        ...

    def patch_event(self, target: Target, event_id: str, changes: EventBody) -> RemoteEvent:
        """Change only the given fields; raise EventGoneError if the event is deleted or missing."""
        ...

    def delete_event(self, target: Target, event_id: str) -> None:
        """Delete an event; an event that is already gone counts as deleted."""
        ...

    def list_booking_events(
        self, target: Target, booking_id: str | None = None, show_deleted: bool = False
    ) -> list[RemoteEvent]:
        """List the events that carry a booking id, optionally only those of one booking."""
        ...

    def pacing_wait(self, target: Target, calls_ahead: int = 0) -> float:
        """Return the seconds a call for `target` made now would wait for its acting user's pacing slot.

        Pacing that delays every user's calls alike, such as a project-wide rate, is left out.
        `calls_ahead` counts the calls of the same acting user expected to take a slot first. A
        calendar without client-side pacing returns 0.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...
