"""A booking snapshot: one delivery's payload, with the fields the sync reads checked and typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connector.envelope import parse_timestamp


class SnapshotError(ValueError):
    """The payload lacks a field the calendar event needs; the message names the field, not the booking."""


@dataclass(frozen=True)
class Snapshot:
    """A whole booking as of one event; `version` and `rank` order snapshots of one booking."""

    booking_id: str
    event: str
    version: str
    rank: int
    payload: dict[str, Any]
    delivery_id: str

    @property
    def status(self) -> object:
        return self.payload.get("status")

    @property
    def rescheduled_from(self) -> str | None:
        value = self.payload.get("rescheduledFrom")
        return value if isinstance(value, str) and value and value != self.booking_id else None

    @property
    def host(self) -> str:
        """Name the host for messages, by email, user id or name, whichever the payload has."""
        for key in ("hostEmail", "hostUserId", "hostName"):
            value = self.payload.get(key)
            if isinstance(value, str) and value:
                return value
        return "(unknown host)"

    def times(self) -> tuple[str, str]:
        """Return the start and end as RFC 3339 UTC text; raise SnapshotError if missing or reversed."""
        start = self._time("startTime")
        end = self._time("endTime")
        if end < start:
            raise SnapshotError(f"the booking ends ({end}) before it starts ({start})")
        return start, end

    def _time(self, key: str) -> str:
        value = self.payload.get(key)
        moment = parse_timestamp(value) if isinstance(value, str) else None
        if moment is None:
            raise SnapshotError(f"no valid {key} (got {value!r})")
        return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")
