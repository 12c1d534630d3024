"""Event resource rules: id syntax, start and end validation, patch merging and timestamps."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tests.emulator.errors import ApiError

# Google accepts client-chosen ids in base32hex: lowercase a-v and digits, 5 to 1024 characters.
EVENT_ID_PATTERN = re.compile(r"[a-v0-9]{5,1024}")

# Fields the server owns. Request bodies cannot set them.
SERVER_FIELDS = frozenset({"kind", "etag", "id", "htmlLink", "created", "updated", "creator", "organizer", "iCalUID"})


@dataclass(frozen=True)
class TimeSpan:
    """An event's start and end as UTC instants, and whether they are all-day dates."""

    start: datetime
    end: datetime
    all_day: bool


def validate_event_id(event_id: Any) -> str:
    """Return a client-chosen event id, or raise 400 when Google would reject it."""
    if not isinstance(event_id, str) or EVENT_ID_PATTERN.fullmatch(event_id) is None:
        raise ApiError(400, "invalid", "Invalid resource id value.")
    return event_id


def event_span(resource: dict[str, Any]) -> TimeSpan:
    """Validate an event's start and end and return them as UTC instants, or raise 400."""
    # Google checks the end first: a body with neither time fails with "Missing end time."
    end, end_is_date = parse_event_time(resource.get("end"), "end")
    start, start_is_date = parse_event_time(resource.get("start"), "start")

    if start_is_date != end_is_date:
        raise ApiError(400, "invalid", "Start and end times must either both be date or both be dateTime.")

    # All-day events end on the following date, so an equal date is an empty range too.
    if end < start or (start_is_date and end == start):
        raise ApiError(400, "timeRangeEmpty", "The specified time range is empty.")
    return TimeSpan(start, end, start_is_date)


def parse_event_time(value: Any, name: str) -> tuple[datetime, bool]:
    """Convert an EventDateTime (`date`, or `dateTime` with an offset or `timeZone`) into a UTC instant."""
    if value is None or value == {}:
        raise ApiError(400, "required", f"Missing {name} time.")
    if not isinstance(value, dict):
        raise ApiError(400, "invalid", f"Invalid {name} time.")

    zone_name = value.get("timeZone")
    zone = None
    if zone_name is not None:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ApiError(400, "invalid", f"Invalid time zone definition for {name} time.") from None

    if value.get("dateTime") is not None:
        instant = parse_rfc3339(value["dateTime"])
        if instant is None:
            raise ApiError(400, "invalid", f"Invalid {name} time.")

        if instant.tzinfo is None:
            if zone is None:
                raise ApiError(400, "required", f"Missing time zone definition for {name} time.")
            instant = instant.replace(tzinfo=zone)
        return instant.astimezone(timezone.utc), False

    if value.get("date") is not None:
        try:
            day = date.fromisoformat(value["date"])
        except (TypeError, ValueError):
            raise ApiError(400, "invalid", f"Invalid {name} time.") from None

        # Every emulated calendar is in UTC, so an all-day event starts at UTC midnight.
        return datetime.combine(day, time.min, tzinfo=timezone.utc), True

    raise ApiError(400, "required", f"Missing {name} time.")


def parse_rfc3339(text: Any) -> datetime | None:
    """Parse an RFC 3339 timestamp such as `2024-05-01T09:00:00Z`, or return None."""
    if not isinstance(text, str) or "T" not in text.upper():
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def format_timestamp(instant: datetime) -> str:
    """Format a UTC instant with milliseconds, as Google writes `created` and `updated`."""
    utc = instant.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply Calendar patch semantics in place: objects merge key by key, null removes, arrays replace."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
            continue

        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            if key in ("start", "end", "originalStartTime"):
                drop_other_time_kind(current, value)
            merge_patch(current, value)
        else:
            target[key] = copy.deepcopy(value)


def drop_other_time_kind(current: dict[str, Any], patch: dict[str, Any]) -> None:
    """Remove `dateTime` when a patch sets `date`, and the reverse, so an EventDateTime never has both."""
    if patch.get("date") is not None and patch.get("dateTime") is None:
        current.pop("dateTime", None)
    if patch.get("dateTime") is not None and patch.get("date") is None:
        current.pop("date", None)


def client_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of the fields a client may write, leaving out server-owned ones."""
    return {key: copy.deepcopy(value) for key, value in body.items() if key not in SERVER_FIELDS}


def search_text(resource: dict[str, Any]) -> str:
    """Collect the lowercase text that the `q` parameter searches."""
    parts = [str(resource.get(key, "")) for key in ("summary", "description", "location")]
    for attendee in resource.get("attendees") or []:
        if isinstance(attendee, dict):
            parts.append(str(attendee.get("email", "")))
            parts.append(str(attendee.get("displayName", "")))
    return "\n".join(parts).lower()


def matches_extended_properties(resource: dict[str, Any], scope: str, filters: list[str]) -> bool:
    """Check `propertyName=value` filters against the event's private or shared extended properties."""
    properties = (resource.get("extendedProperties") or {}).get(scope) or {}
    for condition in filters:
        name, _, value = condition.partition("=")
        if properties.get(name) != value:
            return False
    return True
