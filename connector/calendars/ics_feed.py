"""iCalendar (RFC 5545) rendering of stored events, and the Starlette route that serves it.

A feed URL carries the calendar's secret token, which is the only access control, so no
response or log line here contains a token.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from icalendar import Calendar, Event, vDuration, vText
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from connector.calendars.ics_store import IcsCalendar, IcsEvent

logger = logging.getLogger(__name__)

PRODUCT_ID = "-//proximity-sync//ics feed//EN"
UID_DOMAIN = "proximity-sync"
FEED_MEDIA_TYPE = "text/calendar; charset=utf-8"

# Clients that honour REFRESH-INTERVAL (RFC 7986) or X-PUBLISHED-TTL poll this often.
# Others use their own schedule, which the feed cannot change.
REFRESH_INTERVAL = timedelta(minutes=15)

# Google `status` values mapped to iCalendar STATUS. Cancelled events never reach the feed.
ICAL_STATUS = {"confirmed": "CONFIRMED", "tentative": "TENTATIVE"}

ICAL_TRANSPARENCY = {"opaque": "OPAQUE", "transparent": "TRANSPARENT"}

EventTime = datetime | date


def as_utc(value: datetime) -> datetime:
    """Return `value` as an aware UTC datetime, reading a naive value as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_event_time(value: Any, field: str) -> EventTime:
    """Parse a Google `start` or `end` object into a UTC datetime, or a date for all-day events.

    Raises ValueError naming `field` when the object is missing, malformed or has an unknown zone.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{field} is missing: expected an object with dateTime or date")

    if "dateTime" in value:
        try:
            moment = datetime.fromisoformat(str(value["dateTime"]))
        except ValueError as error:
            raise ValueError(f"{field}.dateTime is not RFC 3339: {value['dateTime']!r}") from error

        if moment.tzinfo is not None:
            return moment.astimezone(UTC)

        # A dateTime without an offset is local time in the zone named by timeZone.
        zone_name = value.get("timeZone")
        if not zone_name:
            raise ValueError(f"{field}.dateTime has no UTC offset and {field}.timeZone is missing")
        try:
            zone = ZoneInfo(str(zone_name))
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"{field}.timeZone is not a known IANA zone: {zone_name!r}") from error
        return moment.replace(tzinfo=zone).astimezone(UTC)

    if "date" in value:
        try:
            return date.fromisoformat(str(value["date"]))
        except ValueError as error:
            raise ValueError(f"{field}.date is not YYYY-MM-DD: {value['date']!r}") from error

    raise ValueError(f"{field} has neither dateTime nor date")


def parse_event_times(body: dict[str, Any]) -> tuple[EventTime, EventTime]:
    """Parse and check an event's start and end, raising ValueError if they cannot form an event."""
    start = parse_event_time(body.get("start"), "start")
    end = parse_event_time(body.get("end"), "end")

    if isinstance(start, datetime) != isinstance(end, datetime):
        raise ValueError("start and end must both use dateTime or both use date")
    if end < start:
        raise ValueError(f"end ({end.isoformat()}) is before start ({start.isoformat()})")

    return start, end


def build_vevent(row: IcsEvent) -> Event:
    """Build the VEVENT for one live stored event, raising ValueError if its times are invalid."""
    body = json.loads(row.body)
    start, end = parse_event_times(body)
    updated = as_utc(row.updated).replace(microsecond=0)

    event = Event()
    event.add("uid", f"{row.event_id}@{UID_DOMAIN}")
    # Without a METHOD property, RFC 5545 defines DTSTAMP as the time of the last revision.
    # Using the stored time instead of the render time keeps unchanged feeds byte-identical.
    event.add("dtstamp", updated)
    event.add("created", as_utc(row.created).replace(microsecond=0))
    event.add("last-modified", updated)
    event.add("sequence", row.sequence)
    event.add("dtstart", start)
    event.add("dtend", end)

    for key in ("summary", "description", "location"):
        text = body.get(key)
        if text:
            event.add(key, str(text))

    event.add("status", ICAL_STATUS.get(row.status, "CONFIRMED"))

    transparency = ICAL_TRANSPARENCY.get(str(body.get("transparency", "")))
    if transparency:
        event.add("transp", transparency)

    return event


def build_feed(calendar_id: str, rows: Iterable[IcsEvent]) -> bytes:
    """Render a VCALENDAR with one VEVENT per given event, encoded as UTF-8 with CRLF lines.

    The caller passes live events only. A subscribing client replaces its copy of the calendar
    with each fetch, so a deleted event that is left out disappears in every client. A VEVENT
    with STATUS:CANCELLED is not used, because RFC 5545 leaves its display to the client, and
    a client may keep showing it as an ordinary event.
    """
    calendar = Calendar()
    calendar.add("prodid", PRODUCT_ID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("x-wr-calname", vText(calendar_id))
    calendar.add("refresh-interval", REFRESH_INTERVAL, parameters={"VALUE": "DURATION"})
    calendar.add("x-published-ttl", vDuration(REFRESH_INTERVAL))

    for row in rows:
        try:
            calendar.add_component(build_vevent(row))
        except ValueError as error:
            # Writes validate times, so only a row edited outside this backend gets here.
            logger.warning(
                "left event %s of calendar %s out of its feed: %s",
                row.event_id,
                calendar_id,
                error,
            )

    return calendar.to_ical()


def feed_url(base_url: str, token: str) -> str:
    """Return the subscription URL of a feed under the app's public base URL."""
    return f"{base_url.rstrip('/')}/feeds/{token}.ics"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Return whether an If-None-Match header value names `etag` (weak or strong) or is `*`."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def feed_routes(backend: IcsCalendar) -> list[Route]:
    """Build the route that serves `GET /feeds/{token}.ics` from `backend`.

    An unknown token gets the same 404 as a malformed one, so no response reveals whether a
    calendar exists. NOTE: the path contains the token, so an HTTP server's access log
    (uvicorn's included) records it unless that log is turned off or filtered.
    """

    def serve_feed(request: Request) -> Response:
        token = request.path_params["token"]

        feed = backend.render_feed(token)
        if feed is None:
            return PlainTextResponse("Not Found", status_code=404)

        # The feed bytes depend only on stored data, so a hash of them is a stable ETag.
        etag = '"' + hashlib.sha256(feed).hexdigest()[:32] + '"'
        headers = {
            "ETag": etag,
            # Feeds contain invitee details, so shared caches must not store them.
            "Cache-Control": "private, no-cache",
        }
        if etag_matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)

        return Response(feed, media_type=FEED_MEDIA_TYPE, headers=headers)

    return [Route("/feeds/{token}.ics", serve_feed, methods=["GET"])]
