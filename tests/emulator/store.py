"""Calendars and their events, with the Calendar API's rules for each operation.

Every public method takes the store's lock, so the server thread and test threads can call
them at once. Methods named after API operations check the acting user's access and raise
`ApiError`. The `*_directly` methods act as the calendar's host would in the web UI.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tests.emulator.errors import ApiError
from tests.emulator.events import (
    TimeSpan,
    client_fields,
    event_span,
    format_timestamp,
    matches_extended_properties,
    merge_patch,
    parse_rfc3339,
    search_text,
    validate_event_id,
)

DEFAULT_PAGE_SIZE = 250
MAX_PAGE_SIZE = 2500
EVENT_STATUSES = frozenset({"confirmed", "tentative", "cancelled"})

# Query parameters that Google rejects in combination with syncToken.
SYNC_INCOMPATIBLE_PARAMETERS = (
    "iCalUID",
    "orderBy",
    "privateExtendedProperty",
    "q",
    "sharedExtendedProperty",
    "timeMin",
    "timeMax",
    "updatedMin",
)

QueryParameters = dict[str, list[str]]


@dataclass
class StoredEvent:
    """An event resource with its parsed time span and the revision of its last write."""

    resource: dict[str, Any]
    span: TimeSpan
    revision: int

    @property
    def cancelled(self) -> bool:
        return self.resource.get("status") == "cancelled"


@dataclass
class Calendar:
    """A calendar and the users who may use it. A calendar with neither owner nor shares is open to every user."""

    calendar_id: str
    owner: str | None = None
    shared_with: frozenset[str] = frozenset()
    events: dict[str, StoredEvent] = field(default_factory=dict)

    def allows(self, user: str) -> bool:
        """Whether `user` may read and write the calendar's events."""
        if self.owner is None and not self.shared_with:
            return True
        return user == self.owner or user in self.shared_with


class CalendarStore:
    """The emulated calendars and events."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._calendars: dict[str, Calendar] = {}
        self._last_stamp = 0
        # Sync tokens older than this revision fail with 410, as Google's do once they expire.
        self._sync_floor = 0
        self.auto_user_calendars = True

    # ----- calendars -----

    def add_calendar(self, calendar_id: str, owner: str | None, shared_with: Iterable[str]) -> None:
        """Create or replace a calendar's access rules, keeping the events it already has."""
        with self._lock:
            calendar = self._calendars.setdefault(calendar_id, Calendar(calendar_id))
            calendar.owner = owner
            calendar.shared_with = frozenset(shared_with)

    def reset(self) -> None:
        """Forget every calendar and event and restore `auto_user_calendars`."""
        with self._lock:
            self._calendars.clear()
            self.auto_user_calendars = True
            self._sync_floor = self._next_stamp()

    def invalidate_sync_tokens(self) -> None:
        """Make every sync token issued so far fail with 410 `fullSyncRequired`."""
        with self._lock:
            self._sync_floor = self._next_stamp()

    def calendar_resource(self, user: str, calendar_id: str) -> dict[str, Any]:
        """Return the calendars.get resource for a calendar the user may access."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            return {
                "kind": "calendar#calendar",
                "etag": f'"{self._last_stamp}"',
                "id": calendar.calendar_id,
                "summary": calendar.calendar_id,
                "timeZone": "UTC",
            }

    def _accessible_calendar(self, user: str, calendar_id: str) -> Calendar:
        """Find a calendar the user may access, creating the user's own calendar on first use."""
        calendar = self._calendars.get(calendar_id)
        if calendar is None and self.auto_user_calendars and calendar_id == user:
            calendar = Calendar(calendar_id, owner=user)
            self._calendars[calendar_id] = calendar

        # Google returns 404 both for missing calendars and for calendars not shared with the caller.
        if calendar is None or not calendar.allows(user):
            raise ApiError(404, "notFound", "Not Found")
        return calendar

    def _calendar_for_host(self, calendar_id: str) -> Calendar:
        calendar = self._calendars.get(calendar_id)
        if calendar is None:
            calendar = Calendar(calendar_id, owner=calendar_id)
            self._calendars[calendar_id] = calendar
        return calendar

    # ----- API operations -----

    def insert(self, user: str, calendar_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """events.insert: store a new event, honouring a client-chosen id."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            stored = self._create(calendar, body, creator=user)
            return copy.deepcopy(stored.resource)

    def get(self, user: str, calendar_id: str, event_id: str) -> dict[str, Any]:
        """events.get: return an event, including a cancelled one."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            return copy.deepcopy(self._existing(calendar, event_id).resource)

    def patch(
        self, user: str, calendar_id: str, event_id: str, body: dict[str, Any], if_match: str | None
    ) -> dict[str, Any]:
        """events.patch: merge the body into a live event."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            stored = self._writable(calendar, event_id, if_match)

            resource = copy.deepcopy(stored.resource)
            merge_patch(resource, client_fields(body))
            self._commit_change(stored, resource)
            return copy.deepcopy(stored.resource)

    def update(
        self, user: str, calendar_id: str, event_id: str, body: dict[str, Any], if_match: str | None
    ) -> dict[str, Any]:
        """events.update: replace a live event's client fields with the body."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            stored = self._writable(calendar, event_id, if_match)

            resource = {key: value for key, value in stored.resource.items() if key in KEPT_ON_UPDATE}
            resource.update(client_fields(body))
            resource.setdefault("status", "confirmed")
            resource.setdefault("reminders", {"useDefault": True})
            self._commit_change(stored, resource)
            return copy.deepcopy(stored.resource)

    def delete(self, user: str, calendar_id: str, event_id: str, if_match: str | None) -> None:
        """events.delete: mark the event cancelled. A second delete fails with 410."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            stored = self._existing(calendar, event_id)
            if stored.cancelled:
                raise ApiError(410, "deleted", "Resource has been deleted")

            check_precondition(stored, if_match)
            self._cancel(stored)

    def move(self, user: str, calendar_id: str, event_id: str, destination: str | None) -> dict[str, Any]:
        """events.move: move a live event to another calendar under the same id."""
        if not destination:
            raise ApiError(400, "required", "Required parameter: destination")

        with self._lock:
            source = self._accessible_calendar(user, calendar_id)
            stored = self._existing(source, event_id)
            if stored.cancelled:
                raise ApiError(403, "forbidden", "Forbidden")

            target = self._accessible_calendar(user, destination)
            if target is source:
                return copy.deepcopy(stored.resource)
            if event_id in target.events:
                raise ApiError(409, "duplicate", "The requested identifier already exists.")

            moved = copy.deepcopy(stored.resource)
            moved["organizer"] = {"email": target.calendar_id, "self": True}
            moved["htmlLink"] = html_link(event_id, target.calendar_id)
            target_event = StoredEvent(moved, stored.span, 0)
            self._stamp(target_event)
            target.events[event_id] = target_event

            # NOTE: the source keeps a cancelled copy, so a sync of the source calendar learns of the
            # move and the id stays taken there. Whether Google's events.get on the source then
            # returns 200 or 404 is not verified.
            self._cancel(stored)
            return copy.deepcopy(moved)

    def list(self, user: str, calendar_id: str, query: QueryParameters) -> dict[str, Any]:
        """events.list: filter, order and page a calendar's events."""
        with self._lock:
            calendar = self._accessible_calendar(user, calendar_id)
            sync_revision = self._sync_revision(query)
            selected = self._select(calendar, query, sync_revision)

            order_by = single(query, "orderBy")
            selected.sort(key=lambda stored: page_key(stored, order_by))

            page_size = parse_page_size(single(query, "maxResults"))
            after, snapshot = decode_page_token(single(query, "pageToken"))
            snapshot = snapshot or self._last_stamp
            if after is not None:
                selected = [stored for stored in selected if page_key(stored, order_by) > after]

            page = selected[:page_size]
            document: dict[str, Any] = {
                "kind": "calendar#events",
                "etag": f'"{self._last_stamp}"',
                "summary": calendar.calendar_id,
                "description": "",
                "updated": format_timestamp(datetime.now(timezone.utc)),
                "timeZone": "UTC",
                "accessRole": "owner" if calendar.owner == user else "writer",
                "defaultReminders": [],
                "items": [copy.deepcopy(stored.resource) for stored in page],
            }

            if len(selected) > page_size:
                document["nextPageToken"] = encode_page_token(page_key(page[-1], order_by), snapshot)
            else:
                # Changes made while the client paged are delivered again by the next sync, never lost.
                document["nextSyncToken"] = encode_sync_token(snapshot)
            return document

    def _select(self, calendar: Calendar, query: QueryParameters, sync_revision: int | None) -> list[StoredEvent]:
        """Apply the list filters and return the matching stored events."""
        show_deleted = sync_revision is not None or parse_boolean(single(query, "showDeleted"), "showDeleted")
        time_min = parse_query_time(query, "timeMin")
        time_max = parse_query_time(query, "timeMax")
        updated_min = parse_query_time(query, "updatedMin")
        if time_min is not None and time_max is not None and time_max <= time_min:
            raise ApiError(400, "timeRangeEmpty", "The specified time range is empty.")

        order_by = single(query, "orderBy")
        if order_by not in (None, "startTime", "updated"):
            raise ApiError(400, "invalid", f"Invalid value for orderBy: {order_by}")
        if order_by == "startTime" and single(query, "singleEvents") != "true":
            raise ApiError(400, "badRequest", "The requested ordering is not available for the particular query.")

        private_filters = query.get("privateExtendedProperty", [])
        shared_filters = query.get("sharedExtendedProperty", [])
        words = (single(query, "q") or "").lower().split()
        ical_uid = single(query, "iCalUID")

        # NOTE: recurring events are stored as written. singleEvents does not expand them into instances.
        selected = []
        for stored in calendar.events.values():
            resource = stored.resource
            if stored.cancelled and not show_deleted:
                continue
            if sync_revision is not None and stored.revision <= sync_revision:
                continue
            if time_min is not None and stored.span.end <= time_min:
                continue
            if time_max is not None and stored.span.start >= time_max:
                continue
            if updated_min is not None and parse_rfc3339(resource["updated"]) < updated_min:
                continue
            if ical_uid is not None and resource.get("iCalUID") != ical_uid:
                continue
            if not matches_extended_properties(resource, "private", private_filters):
                continue
            if not matches_extended_properties(resource, "shared", shared_filters):
                continue
            if words and not all(word in search_text(resource) for word in words):
                continue
            selected.append(stored)
        return selected

    def _sync_revision(self, query: QueryParameters) -> int | None:
        """Return the revision a syncToken encodes, or raise when it is invalid or combined with filters."""
        token = single(query, "syncToken")
        if token is None:
            return None

        combined = [name for name in SYNC_INCOMPATIBLE_PARAMETERS if name in query]
        if combined:
            raise ApiError(400, "invalid", f"syncToken cannot be combined with {', '.join(combined)}.")

        revision = decode_sync_token(token)
        if revision is None or revision < self._sync_floor:
            raise ApiError(410, "fullSyncRequired", "Sync token is no longer valid, a full sync is required.")
        return revision

    # ----- direct access for tests -----

    def events(self, calendar_id: str, include_deleted: bool) -> list[dict[str, Any]]:
        """Return copies of a calendar's events ordered by start, or an empty list for an unknown calendar."""
        with self._lock:
            calendar = self._calendars.get(calendar_id)
            if calendar is None:
                return []

            stored_events = sorted(calendar.events.values(), key=lambda stored: page_key(stored, None))
            return [
                copy.deepcopy(stored.resource)
                for stored in stored_events
                if include_deleted or not stored.cancelled
            ]

    def event(self, calendar_id: str, event_id: str) -> dict[str, Any] | None:
        """Return a copy of one event, cancelled or not, or None."""
        with self._lock:
            calendar = self._calendars.get(calendar_id)
            stored = calendar.events.get(event_id) if calendar else None
            return copy.deepcopy(stored.resource) if stored else None

    def insert_event_directly(self, calendar_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """Store an event as the calendar's host, creating the calendar if needed."""
        with self._lock:
            calendar = self._calendar_for_host(calendar_id)
            stored = self._create(calendar, event, creator=calendar.owner or calendar_id)
            return copy.deepcopy(stored.resource)

    def patch_event_directly(self, calendar_id: str, event_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge changes into an event, cancelled or not, as the host's edit would."""
        with self._lock:
            stored = self._host_event(calendar_id, event_id)
            resource = copy.deepcopy(stored.resource)
            merge_patch(resource, client_fields(changes))
            self._commit_change(stored, resource)
            return copy.deepcopy(stored.resource)

    def delete_event_directly(self, calendar_id: str, event_id: str) -> dict[str, Any]:
        """Cancel an event as the host's delete would. Deleting a cancelled event changes nothing."""
        with self._lock:
            stored = self._host_event(calendar_id, event_id)
            if not stored.cancelled:
                self._cancel(stored)
            return copy.deepcopy(stored.resource)

    def _host_event(self, calendar_id: str, event_id: str) -> StoredEvent:
        calendar = self._calendars.get(calendar_id)
        stored = calendar.events.get(event_id) if calendar else None
        if stored is None:
            raise KeyError(f"event {event_id!r} not found in calendar {calendar_id!r}")
        return stored

    # ----- shared steps -----

    def _next_stamp(self) -> int:
        """Return a strictly increasing number of microseconds, used for etags and sync revisions."""
        self._last_stamp = max(self._last_stamp + 1, time.time_ns() // 1000)
        return self._last_stamp

    def _stamp(self, stored: StoredEvent) -> None:
        """Give the event a new revision, etag and `updated` time."""
        stored.revision = self._next_stamp()
        stored.resource["etag"] = f'"{stored.revision}"'
        stored.resource["updated"] = format_timestamp(datetime.fromtimestamp(stored.revision / 1e6, timezone.utc))

    def _create(self, calendar: Calendar, body: dict[str, Any], creator: str) -> StoredEvent:
        if not isinstance(body, dict):
            raise ApiError(400, "parseError", "Parse Error")

        if body.get("id") is not None:
            event_id = validate_event_id(body["id"])
            # Ids of cancelled events stay taken.
            if event_id in calendar.events:
                raise ApiError(409, "duplicate", "The requested identifier already exists.")
        else:
            # A uuid4 in hex uses only 0-9 and a-f, a subset of Google's id alphabet.
            event_id = uuid.uuid4().hex

        fields = client_fields(body)
        span = event_span(fields)
        status = validate_status(fields.pop("status", "confirmed"))
        ical_uid = body.get("iCalUID") if isinstance(body.get("iCalUID"), str) else f"{event_id}@google.com"

        resource: dict[str, Any] = {
            "kind": "calendar#event",
            "etag": "",
            "id": event_id,
            "status": status,
            "htmlLink": html_link(event_id, calendar.calendar_id),
            "created": "",
            "updated": "",
            **fields,
            "creator": person(creator, calendar.calendar_id),
            "organizer": {"email": calendar.calendar_id, "self": True},
            "iCalUID": ical_uid,
        }
        resource.setdefault("sequence", 0)
        resource.setdefault("reminders", {"useDefault": True})
        resource.setdefault("eventType", "default")

        stored = StoredEvent(resource, span, 0)
        self._stamp(stored)
        resource["created"] = resource["updated"]
        calendar.events[event_id] = stored
        return stored

    def _existing(self, calendar: Calendar, event_id: str) -> StoredEvent:
        stored = calendar.events.get(event_id)
        if stored is None:
            raise ApiError(404, "notFound", "Not Found")
        return stored

    def _writable(self, calendar: Calendar, event_id: str, if_match: str | None) -> StoredEvent:
        """Find a live event for patch or update and check the If-Match precondition."""
        stored = self._existing(calendar, event_id)

        # NOTE: a cancelled event fails with 403 before If-Match is compared. Google's order of the
        # two checks is not verified.
        if stored.cancelled:
            raise ApiError(403, "forbidden", "Forbidden")

        check_precondition(stored, if_match)
        return stored

    def _commit_change(self, stored: StoredEvent, resource: dict[str, Any]) -> None:
        """Validate a changed resource and store it with a new etag. An invalid one raises ApiError and changes nothing."""
        span = event_span(resource)
        resource["status"] = validate_status(resource.get("status", "confirmed"))

        times_changed = resource.get("start") != stored.resource.get("start") or resource.get(
            "end"
        ) != stored.resource.get("end")
        sequence_given = resource.get("sequence") != stored.resource.get("sequence")
        if times_changed and not sequence_given:
            resource["sequence"] = int(stored.resource.get("sequence", 0)) + 1

        stored.resource = resource
        stored.span = span
        self._stamp(stored)

    def _cancel(self, stored: StoredEvent) -> None:
        stored.resource["status"] = "cancelled"
        self._stamp(stored)


# Fields that events.update keeps from the stored resource. The body replaces everything else.
KEPT_ON_UPDATE = frozenset({"kind", "etag", "id", "htmlLink", "created", "updated", "creator", "organizer", "iCalUID", "sequence", "eventType"})


def check_precondition(stored: StoredEvent, if_match: str | None) -> None:
    """Raise 412 when an If-Match header names another etag than the event's current one."""
    if if_match is None or if_match.strip() == "*":
        return

    candidates = [candidate.strip() for candidate in if_match.split(",")]
    if stored.resource["etag"] not in candidates:
        raise ApiError(412, "conditionNotMet", "Precondition Failed")


def validate_status(status: Any) -> str:
    if status not in EVENT_STATUSES:
        raise ApiError(400, "invalid", f"Invalid value for status: {status}")
    return status


def person(email: str, calendar_id: str) -> dict[str, Any]:
    """Build a creator entry. `self` marks the calendar's own address, as Google does."""
    entry: dict[str, Any] = {"email": email}
    if email == calendar_id:
        entry["self"] = True
    return entry


def html_link(event_id: str, calendar_id: str) -> str:
    """Build the web UI link, whose eid is base64url of the event id and calendar id."""
    eid = base64.urlsafe_b64encode(f"{event_id} {calendar_id}".encode()).decode("ascii").rstrip("=")
    return f"https://www.google.com/calendar/event?eid={eid}"


def page_key(stored: StoredEvent, order_by: str | None) -> list[str]:
    """Return the list order's sort key. Page tokens carry the key of the page's last event."""
    if order_by == "updated":
        return [stored.resource["updated"], stored.resource["id"]]
    return [stored.span.start.isoformat(), stored.resource["id"]]


def single(query: QueryParameters, name: str) -> str | None:
    """Return the last value of a query parameter, or None when it is absent."""
    values = query.get(name)
    return values[-1] if values else None


def parse_boolean(value: str | None, name: str) -> bool:
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise ApiError(400, "invalid", f"Invalid boolean value for {name}: {value}")


def parse_page_size(value: str | None) -> int:
    """Parse maxResults. Google caps pages at 2500 events, whatever maxResults requests."""
    if value is None:
        return DEFAULT_PAGE_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ApiError(400, "invalid", f"Invalid value for maxResults: {value}") from None
    if size < 1:
        raise ApiError(400, "invalid", f"Invalid value for maxResults: {value}")
    return min(size, MAX_PAGE_SIZE)


def parse_query_time(query: QueryParameters, name: str) -> datetime | None:
    """Parse an RFC 3339 query parameter, which Google requires to carry an offset."""
    value = single(query, name)
    if value is None:
        return None

    instant = parse_rfc3339(value)
    if instant is None or instant.tzinfo is None:
        raise ApiError(400, "badRequest", f"Bad Request: {name} must be an RFC 3339 timestamp with an offset.")
    return instant


def encode_page_token(after: list[str], snapshot: int) -> str:
    document = json.dumps({"after": after, "snapshot": snapshot}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode("ascii")


def decode_page_token(token: str | None) -> tuple[list[str] | None, int | None]:
    """Return the sort key after which the page starts and the revision of the first page."""
    if token is None:
        return None, None
    try:
        document = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        return list(document["after"]), int(document["snapshot"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeEncodeError):
        raise ApiError(400, "invalid", "Invalid page token value.") from None


def encode_sync_token(revision: int) -> str:
    return base64.urlsafe_b64encode(f"sync:{revision}".encode()).decode("ascii")


def decode_sync_token(token: str) -> int | None:
    try:
        prefix, _, number = base64.urlsafe_b64decode(token.encode("ascii")).decode().partition(":")
        return int(number) if prefix == "sync" else None
    except (ValueError, binascii.Error, UnicodeError):
        return None
