"""The `ics` calendar backend: events kept in the app's database, published as iCalendar feeds.

It behaves like Google Calendar towards the sync worker: ids are chosen by the caller and
never reused, deletes are soft, and patches merge into the stored event. Any calendar id
exists without setup. Each public method opens its own short session, so one instance can
serve several threads.
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Index, Text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, Session, SQLModel, col, select

from connector.calendars.base import (
    BOOKING_ID_PROPERTY,
    EventAlreadyExistsError,
    EventBody,
    EventGoneError,
    PermanentCalendarError,
    RemoteEvent,
    Target,
    TransientCalendarError,
)
from connector.calendars.ics_feed import UID_DOMAIN, as_utc, build_feed, parse_event_times

logger = logging.getLogger(__name__)

EVENT_STATUSES = ("confirmed", "tentative", "cancelled")

# Keys the calendar sets itself. Like Google, the backend ignores them in inserts and patches.
SERVER_FIELDS = frozenset(
    {"id", "etag", "iCalUID", "sequence", "created", "updated", "kind", "htmlLink"}
)

# secrets.token_urlsafe(24) returns 32 characters of the URL-safe base64 alphabet. The pattern
# admits other lengths so tokens stored by an older FEED_TOKEN_BYTES keep working.
FEED_TOKEN_BYTES = 24
FEED_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")

# A patch re-reads and retries when another writer changed the event in between.
# Every lost attempt means another write succeeded, so the limit only bounds heavy contention.
MAX_PATCH_ATTEMPTS = 20


class IcsEvent(SQLModel, table=True):
    """One event of one calendar. The body is stored without `status` and server fields."""

    __tablename__ = "ics_events"
    __table_args__ = (Index("ix_ics_events_calendar_booking", "calendar_id", "booking_id"),)

    calendar_id: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    body: str = Field(sa_type=Text)
    status: str
    booking_id: str | None = None
    sequence: int = 0
    etag: str
    created: datetime
    updated: datetime


class IcsFeed(SQLModel, table=True):
    """The secret token that publishes one calendar as a feed."""

    __tablename__ = "ics_feeds"

    calendar_id: str = Field(primary_key=True)
    token: str = Field(unique=True)
    created: datetime


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime, which SQLModel's columns require."""
    return datetime.now(UTC)


def new_etag() -> str:
    return '"' + secrets.token_hex(8) + '"'


def format_timestamp(value: datetime) -> str:
    """Format a stored timestamp as RFC 3339 with milliseconds, as Google does."""
    return as_utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def booking_id_of(body: EventBody) -> str | None:
    """Return the booking id from `extendedProperties.private`, or None."""
    extended = body.get("extendedProperties")
    private = extended.get("private") if isinstance(extended, dict) else None
    value = private.get(BOOKING_ID_PROPERTY) if isinstance(private, dict) else None
    return None if value is None else str(value)


def invalid_event(message: str, calendar_id: str) -> PermanentCalendarError:
    return PermanentCalendarError(message, status=400, reason="invalid", calendar_id=calendar_id)


def client_fields(body: Any, calendar_id: str) -> EventBody:
    """Return a deep copy of `body` without server fields, or raise a 400 for a non-JSON body."""
    if not isinstance(body, dict):
        raise invalid_event(f"event body must be a dict, not {type(body).__name__}", calendar_id)

    try:
        fields = json.loads(json.dumps(body))
    except (TypeError, ValueError) as error:
        raise invalid_event(f"event body is not JSON-serializable: {error}", calendar_id) from error

    for key in SERVER_FIELDS:
        fields.pop(key, None)
    return fields


def check_event(body: EventBody, status: str, calendar_id: str) -> None:
    """Raise PermanentCalendarError (400) if the status or the start and end are invalid."""
    if status not in EVENT_STATUSES:
        raise invalid_event(
            f"event status {status!r} is invalid: use one of {', '.join(EVENT_STATUSES)}",
            calendar_id,
        )

    try:
        parse_event_times(body)
    except ValueError as error:
        raise invalid_event(f"event times are invalid: {error}", calendar_id) from error


def merge_extended_properties(current: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge each `extendedProperties` section (`private`, `shared`) key by key.

    A None value removes its key or section.
    """
    merged: dict[str, Any] = copy.deepcopy(current) if isinstance(current, dict) else {}

    for section, values in changes.items():
        if values is None:
            merged.pop(section, None)
            continue
        if not isinstance(values, dict) or not isinstance(merged.get(section), dict):
            merged[section] = values
            continue

        for key, value in values.items():
            if value is None:
                merged[section].pop(key, None)
            else:
                merged[section][key] = value

    return merged


def merge_patch(body: EventBody, changes: EventBody) -> EventBody:
    """Apply a patch: top-level keys replace, None removes a key, extendedProperties merge."""
    merged = copy.deepcopy(body)

    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif key == "extendedProperties" and isinstance(value, dict):
            merged[key] = merge_extended_properties(merged.get(key), value)
        else:
            merged[key] = value

    return merged


def to_remote(
    event_id: str,
    body: EventBody,
    status: str,
    sequence: int,
    etag: str,
    created: datetime,
    updated: datetime,
) -> RemoteEvent:
    """Build the RemoteEvent, adding the server fields Google returns to the stored body."""
    full_body = copy.deepcopy(body)
    full_body.update(
        {
            "id": event_id,
            "status": status,
            "iCalUID": f"{event_id}@{UID_DOMAIN}",
            "sequence": sequence,
            "etag": etag,
            "created": format_timestamp(created),
            "updated": format_timestamp(updated),
        }
    )
    return RemoteEvent(event_id=event_id, status=status, body=full_body, etag=etag)


def row_to_remote(row: IcsEvent) -> RemoteEvent:
    return to_remote(
        row.event_id,
        json.loads(row.body),
        row.status,
        row.sequence,
        row.etag,
        row.created,
        row.updated,
    )


@contextmanager
def database_errors(calendar_id: str | None) -> Iterator[None]:
    """Turn a failed database call (locked, unreachable) into a TransientCalendarError."""
    try:
        yield
    except OperationalError as error:
        raise TransientCalendarError(
            f"database call of the ics backend failed: {error.orig}", calendar_id=calendar_id
        ) from error


class IcsCalendar:
    """A CalendarBackend that stores events in SQL tables and serves them as iCalendar feeds.

    The tables come from `SQLModel.metadata.create_all(engine)`, which the caller runs.
    """

    name = "ics"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert_event(self, target: Target, event_id: str, body: EventBody) -> RemoteEvent:
        """Store a new event, raising EventAlreadyExistsError if the calendar ever used the id."""
        calendar_id = target.calendar_id
        if not event_id:
            raise invalid_event("event id must not be empty", calendar_id)

        fields = client_fields(body, calendar_id)
        status = str(fields.pop("status", "confirmed"))
        check_event(fields, status, calendar_id)

        # The feed is created before the event, so an error here leaves nothing stored, and
        # every calendar with events appears in feeds().
        self.feed_token(calendar_id)

        now = utc_now()
        row = IcsEvent(
            calendar_id=calendar_id,
            event_id=event_id,
            body=json.dumps(fields, ensure_ascii=False),
            status=status,
            booking_id=booking_id_of(fields),
            sequence=0,
            etag=new_etag(),
            created=now,
            updated=now,
        )
        # Built before the commit, which expires the row's attributes.
        event = row_to_remote(row)

        with database_errors(calendar_id), Session(self.engine) as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError as error:
                raise EventAlreadyExistsError(
                    f"event id {event_id!r} is already used, by a live or a deleted event",
                    status=409,
                    reason="duplicate",
                    calendar_id=calendar_id,
                ) from error

        return event

    def get_event(self, target: Target, event_id: str) -> RemoteEvent | None:
        """Fetch an event, cancelled ones included; None if the id was never used."""
        with database_errors(target.calendar_id), Session(self.engine) as session:
            row = session.get(IcsEvent, (target.calendar_id, event_id))
            return None if row is None else row_to_remote(row)

    def patch_event(self, target: Target, event_id: str, changes: EventBody) -> RemoteEvent:
        """Merge `changes` into a live event and increment its SEQUENCE.

        Raises EventGoneError if the event is deleted or missing. A patch that changes nothing
        returns the event unchanged, without a new SEQUENCE.
        """
        calendar_id = target.calendar_id
        patch = client_fields(changes, calendar_id)
        new_status = patch.pop("status", None)

        for _ in range(MAX_PATCH_ATTEMPTS):
            with database_errors(calendar_id), Session(self.engine) as session:
                row = session.get(IcsEvent, (calendar_id, event_id))
                if row is None:
                    raise EventGoneError(
                        f"event {event_id!r} was never created, so it cannot be patched",
                        status=404,
                        reason="notFound",
                        calendar_id=calendar_id,
                    )
                if row.status == "cancelled":
                    raise EventGoneError(
                        f"event {event_id!r} is deleted, so it cannot be patched",
                        status=410,
                        reason="deleted",
                        calendar_id=calendar_id,
                    )

                body = json.loads(row.body)
                merged = merge_patch(body, patch)
                status = row.status if new_status is None else str(new_status)
                check_event(merged, status, calendar_id)

                if merged == body and status == row.status:
                    return row_to_remote(row)

                sequence = row.sequence + 1
                etag = new_etag()
                now = utc_now()
                # Compare-and-set on the sequence read above, so a concurrent patch cannot
                # overwrite another's changes. A lost race reads the event again.
                statement = (
                    update(IcsEvent)
                    .where(col(IcsEvent.calendar_id) == calendar_id)
                    .where(col(IcsEvent.event_id) == event_id)
                    .where(col(IcsEvent.sequence) == row.sequence)
                    .values(
                        body=json.dumps(merged, ensure_ascii=False),
                        status=status,
                        booking_id=booking_id_of(merged),
                        sequence=sequence,
                        etag=etag,
                        updated=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                result = session.execute(statement)
                session.commit()

                if result.rowcount == 1:
                    return to_remote(event_id, merged, status, sequence, etag, row.created, now)

            logger.debug("patch of event %s in %s lost a race, retrying", event_id, calendar_id)

        raise TransientCalendarError(
            f"patch of event {event_id!r} failed: {MAX_PATCH_ATTEMPTS} attempts lost races with"
            " other writers. Retry later.",
            reason="conflict",
            calendar_id=calendar_id,
        )

    def delete_event(self, target: Target, event_id: str) -> None:
        """Mark an event cancelled and increment its SEQUENCE.

        Deleting a deleted or unknown event does nothing, because CalendarBackend counts an
        event that is already gone as deleted.
        """
        statement = (
            update(IcsEvent)
            .where(col(IcsEvent.calendar_id) == target.calendar_id)
            .where(col(IcsEvent.event_id) == event_id)
            .where(col(IcsEvent.status) != "cancelled")
            .values(
                status="cancelled",
                sequence=col(IcsEvent.sequence) + 1,
                etag=new_etag(),
                updated=utc_now(),
            )
            .execution_options(synchronize_session=False)
        )

        with database_errors(target.calendar_id), Session(self.engine) as session:
            session.execute(statement)
            session.commit()

    def list_booking_events(
        self, target: Target, booking_id: str | None = None, show_deleted: bool = False
    ) -> list[RemoteEvent]:
        """List the events that carry a booking id, optionally only those of one booking."""
        statement = select(IcsEvent).where(col(IcsEvent.calendar_id) == target.calendar_id)
        if booking_id is None:
            statement = statement.where(col(IcsEvent.booking_id).is_not(None))
        else:
            statement = statement.where(col(IcsEvent.booking_id) == booking_id)
        if not show_deleted:
            statement = statement.where(col(IcsEvent.status) != "cancelled")
        statement = statement.order_by(col(IcsEvent.created), col(IcsEvent.event_id))

        with database_errors(target.calendar_id), Session(self.engine) as session:
            return [row_to_remote(row) for row in session.exec(statement)]

    def feed_token(self, calendar_id: str) -> str:
        """Return the calendar's feed token, creating and storing it on first use."""
        with database_errors(calendar_id), Session(self.engine) as session:
            feed = session.get(IcsFeed, calendar_id)
            if feed is not None:
                return feed.token

            token = secrets.token_urlsafe(FEED_TOKEN_BYTES)
            session.add(IcsFeed(calendar_id=calendar_id, token=token, created=utc_now()))
            try:
                session.commit()
            except IntegrityError:
                # Another thread or process stored a token for this calendar first.
                session.rollback()
                feed = session.get(IcsFeed, calendar_id)
                if feed is None:
                    raise
                return feed.token

        logger.info("created the iCalendar feed of calendar %s", calendar_id)
        return token

    def feeds(self) -> list[tuple[str, str]]:
        """List (calendar id, token) for every calendar that has a feed, by calendar id."""
        statement = select(IcsFeed).order_by(col(IcsFeed.calendar_id))
        with database_errors(None), Session(self.engine) as session:
            return [(feed.calendar_id, feed.token) for feed in session.exec(statement)]

    def render_feed(self, token: str) -> bytes | None:
        """Render the live events of the token's calendar as iCalendar (None for unknown tokens)."""
        if not FEED_TOKEN_PATTERN.fullmatch(token):
            return None

        with database_errors(None), Session(self.engine) as session:
            statement = select(IcsFeed).where(col(IcsFeed.token) == token)
            feed = session.exec(statement).first()
            # The constant-time check also rejects matches from case-insensitive collations.
            if feed is None or not hmac.compare_digest(feed.token.encode(), token.encode()):
                return None

            calendar_id = feed.calendar_id
            events = select(IcsEvent).where(
                col(IcsEvent.calendar_id) == calendar_id,
                col(IcsEvent.status) != "cancelled",
            )
            rows = list(session.exec(events.order_by(col(IcsEvent.event_id))))

        return build_feed(calendar_id, rows)

    def pacing_wait(self, target: Target, calls_ahead: int = 0) -> float:
        """Return 0: events are written to the local database, which needs no pacing."""
        return 0.0

    def close(self) -> None:
        """Do nothing: the engine belongs to the caller, who disposes of it."""

