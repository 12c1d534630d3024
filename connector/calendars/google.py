"""The Google Calendar backend: calendar calls through the API client library, and error mapping.

Each worker thread gets its own discovery client, because the client library's objects
are not meant to be shared between threads. Every request runs through a per-user
`AuthorizedHttp` passed to `execute(http=...)`, so one client per thread serves all users,
and all threads share one pooled httpx client.

Each call first takes a slot from the pacer, then is retried by the retry policy on
transient errors. The client library's own retries stay off (`num_retries=0`).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

from googleapiclient import discovery
from googleapiclient.errors import HttpError
from googleapiclient.http import HttpRequest

from connector.calendars.base import (
    BOOKING_ID_PROPERTY,
    CalendarError,
    CalendarNotFoundError,
    EventAlreadyExistsError,
    EventBody,
    EventGoneError,
    PermanentCalendarError,
    RateLimitedError,
    RemoteEvent,
    Target,
    TransientCalendarError,
)
from connector.calendars.google_auth import GoogleCredentials, load_credentials
from connector.calendars.google_transport import (
    AuthorizedHttp,
    AuthRequest,
    UnboundHttp,
    make_client,
)
from connector.metrics import record_calendar_call
from connector.pacing import Pacer, PacingTimeoutError
from connector.retries import RetryPolicy

logger = logging.getLogger(__name__)

DEFAULT_API_ENDPOINT = "https://www.googleapis.com/calendar/v3/"

# 403 reasons that mean "too fast", so the call may succeed after a short wait.
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})

# 403 reasons that mean a usage quota is used up, so waiting seconds does not help.
QUOTA_REASONS = frozenset({"quotaExceeded", "dailyLimitExceeded"})

# The pause, in seconds, for a user after a quota error without Retry-After. It is a
# choice, not a documented Google value.
DEFAULT_QUOTA_RETRY_AFTER = 1800.0

# The pause, in seconds, for a user after a rate-limit error without Retry-After.
DEFAULT_RATE_LIMIT_PAUSE = 1.0

# Google rejects a quotaUser longer than 40 characters (calendar v3 discovery document).
QUOTA_USER_MAX_LENGTH = 40

# The largest page that events.list returns.
LIST_PAGE_SIZE = 2500


@dataclass(frozen=True)
class _Call:
    """One API method applied to one target, for error messages and logs."""

    method: str
    target: Target
    event_id: str | None = None
    on_event: bool = True

    def describe(self) -> str:
        if self.event_id is None:
            return self.method
        return f"{self.method} of event {self.event_id}"


class GoogleCalendar:
    """Writes events to Google calendars with the Calendar v3 API.

    Safe to call from several threads at once. Raises the errors of
    `connector.calendars.base`, and the constructor raises CredentialsFileError (a ValueError)
    for an unusable credentials file.
    """

    name = "google"

    def __init__(
        self,
        credentials_file: Path,
        api_endpoint: str = DEFAULT_API_ENDPOINT,
        *,
        timeout: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        pacer: Pacer | None = None,
        max_pacing_wait: float = 30.0,
        quota_retry_after: float = DEFAULT_QUOTA_RETRY_AFTER,
        max_connections: int = 32,
        list_page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        """Load the credentials file and set up the shared HTTP client.

        `timeout` is in seconds per connect, read and write phase of each request, token
        requests included. `max_pacing_wait` is the longest a call waits for the pacer
        before it raises RateLimitedError instead. `quota_retry_after` is the pause in
        seconds for a user whose quota is used up. `list_page_size` is the maxResults of
        each events.list page.
        """
        self._credentials: GoogleCredentials = load_credentials(Path(credentials_file))
        self._api_endpoint = api_endpoint
        self._retry_policy = retry_policy or RetryPolicy()
        self._pacer = pacer or Pacer()
        self._max_pacing_wait = max_pacing_wait
        self._quota_retry_after = quota_retry_after
        self._list_page_size = list_page_size
        self._client = make_client(timeout, max_connections)
        self._auth_request = AuthRequest(self._client, timeout)
        self._local = threading.local()

    @property
    def credentials(self) -> GoogleCredentials:
        """The loaded credentials: their kind, principal, client ID and token URI."""
        return self._credentials

    def __enter__(self) -> GoogleCalendar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def pacing_wait(self, target: Target, calls_ahead: int = 0) -> float:
        """Return the seconds a call for `target` made now would wait for its acting user's pacing slot."""
        return self._pacer.user_delay(self._pacing_key(target), calls_ahead)

    def _pacing_key(self, target: Target) -> str:
        """Return the user whose per-user quota a call for `target` counts against."""
        return target.acting_user or self._credentials.principal

    def insert_event(self, target: Target, event_id: str, body: EventBody) -> RemoteEvent:
        """Create an event with a caller-chosen id, or raise EventAlreadyExistsError if it is taken.

        A retry after a lost response can also raise EventAlreadyExistsError, because
        the first attempt may have created the event.
        """
        call = _Call("events.insert", target, event_id, on_event=False)
        request_body = {**body, "id": event_id}

        response = self._execute(
            call,
            lambda service: service.events().insert(
                calendarId=target.calendar_id,
                body=request_body,
                sendUpdates="none",
                quotaUser=_quota_user(target),
            ),
        )
        return _remote_event(response)

    def get_event(self, target: Target, event_id: str) -> RemoteEvent | None:
        """Fetch an event, cancelled ones included, or return None if the calendar has no such id."""
        call = _Call("events.get", target, event_id)

        try:
            response = self._execute(
                call,
                lambda service: service.events().get(
                    calendarId=target.calendar_id,
                    eventId=event_id,
                    quotaUser=_quota_user(target),
                ),
            )
        except EventGoneError as error:
            if error.status == 410:
                return RemoteEvent(event_id, "cancelled", {"id": event_id, "status": "cancelled"})
            return None

        return _remote_event(response)

    def patch_event(self, target: Target, event_id: str, changes: EventBody) -> RemoteEvent:
        """Change only the given fields, or raise EventGoneError if the event is deleted or missing."""
        call = _Call("events.patch", target, event_id)

        try:
            response = self._execute(
                call,
                lambda service: service.events().patch(
                    calendarId=target.calendar_id,
                    eventId=event_id,
                    body=changes,
                    sendUpdates="none",
                    quotaUser=_quota_user(target),
                ),
            )
        except PermanentCalendarError as error:
            # Google returns 403 "forbidden" to a patch of an event that a host deleted,
            # so a get decides whether the event is gone or access is really missing.
            forbidden = error.status == 403 and error.reason == "forbidden"
            if forbidden and self._is_deleted(target, event_id):
                raise EventGoneError(
                    f"{call.describe()}: the event was deleted in the calendar, so it cannot "
                    "be changed",
                    status=error.status,
                    reason=error.reason,
                    calendar_id=target.calendar_id,
                ) from error
            raise

        return _remote_event(response)

    def delete_event(self, target: Target, event_id: str) -> None:
        """Delete an event. An event that is already deleted or was never created counts as deleted."""
        call = _Call("events.delete", target, event_id)

        try:
            self._execute(
                call,
                lambda service: service.events().delete(
                    calendarId=target.calendar_id,
                    eventId=event_id,
                    sendUpdates="none",
                    quotaUser=_quota_user(target),
                ),
            )
        except EventGoneError as error:
            logger.debug(
                "events.delete calendar=%s event=%s: already gone (%s)",
                target.calendar_id,
                event_id,
                error.status,
            )

    def list_booking_events(
        self, target: Target, booking_id: str | None = None, show_deleted: bool = False
    ) -> list[RemoteEvent]:
        """List the events that carry a booking id, optionally only those of one booking.

        Google can filter on a property's value but not on its presence, so listing every
        booking reads the whole calendar and keeps the events that have the property.
        """
        call = _Call("events.list", target, on_event=False)
        property_filter = f"{BOOKING_ID_PROPERTY}={booking_id}" if booking_id is not None else None
        events: list[RemoteEvent] = []
        page_token: str | None = None

        while True:
            response = self._execute(
                call,
                lambda service: service.events().list(
                    calendarId=target.calendar_id,
                    privateExtendedProperty=property_filter,
                    showDeleted=show_deleted,
                    maxResults=self._list_page_size,
                    pageToken=page_token,
                    quotaUser=_quota_user(target),
                ),
            )

            for item in response.get("items", []):
                event = _remote_event(item)
                if _is_booking_event(event, booking_id, show_deleted):
                    events.append(event)

            page_token = response.get("nextPageToken")
            if not page_token:
                return events

    def move_event(
        self, target: Target, event_id: str, destination_calendar_id: str
    ) -> RemoteEvent:
        """Move an event to another calendar, which changes its organizer, and return it as moved.

        Raises EventGoneError when the event or the destination calendar is not found,
        because Google returns 404 for both.
        """
        call = _Call(f"events.move to {destination_calendar_id}", target, event_id)

        response = self._execute(
            call,
            lambda service: service.events().move(
                calendarId=target.calendar_id,
                eventId=event_id,
                destination=destination_calendar_id,
                sendUpdates="none",
                quotaUser=_quota_user(target),
            ),
        )
        return _remote_event(response)

    def _is_deleted(self, target: Target, event_id: str) -> bool:
        current = self.get_event(target, event_id)
        return current is None or not current.is_live

    def _execute(self, call: _Call, build: Callable[[Any], HttpRequest]) -> dict[str, Any]:
        """Run one API call with pacing and retries, and return its decoded response."""
        return self._retry_policy.call(
            lambda: self._attempt(call, build),
            method=call.method,
            calendar_id=call.target.calendar_id,
        )

    def _attempt(self, call: _Call, build: Callable[[Any], HttpRequest]) -> dict[str, Any]:
        """Make one attempt of an API call, and raise a calendar error if it fails."""
        target = call.target
        pacing_key = self._pacing_key(target)

        try:
            self._pacer.acquire(pacing_key, timeout=self._max_pacing_wait)
        except PacingTimeoutError as error:
            raise RateLimitedError(
                f"{call.describe()} was not sent: calls for {pacing_key} are paused for "
                f"{error.wait_seconds:.0f} s after a rate-limit or quota error",
                retry_after=error.wait_seconds,
                calendar_id=target.calendar_id,
            ) from error

        request = build(self._service())
        statuses: list[int] = []
        request.add_response_callback(lambda response: statuses.append(response.status))
        authorizer = self._credentials.authorizer(target.acting_user, self._auth_request)
        http = AuthorizedHttp(self._client, authorizer)
        started = time.monotonic()

        try:
            response = request.execute(http=http, num_retries=0)
        except HttpError as error:
            self._log_call(call, error.status_code, started)
            mapped = self._map_http_error(error, call)
            if isinstance(mapped, RateLimitedError):
                self._pacer.slow_down(pacing_key, mapped.retry_after or DEFAULT_RATE_LIMIT_PAUSE)
            raise mapped from error
        except CalendarError as error:
            self._log_call(call, error.status or type(error).__name__, started)
            if error.calendar_id is None:
                error.calendar_id = target.calendar_id
            raise
        except json.JSONDecodeError as error:
            self._log_call(call, statuses[-1] if statuses else "invalid", started)
            raise TransientCalendarError(
                f"{call.describe()} returned a body that is not valid JSON",
                calendar_id=target.calendar_id,
            ) from error

        self._log_call(call, statuses[-1] if statuses else "ok", started)
        return response if isinstance(response, dict) else {}

    def _service(self) -> Any:
        """Return this thread's discovery client, building it on first use."""
        service = getattr(self._local, "service", None)
        if service is None:
            service = _BuiltResources(discovery.build(
                "calendar",
                "v3",
                http=UnboundHttp(),
                cache_discovery=False,
                static_discovery=True,
                client_options={"api_endpoint": self._api_endpoint},
            ))
            self._local.service = service
        return service

    def _log_call(self, call: _Call, status: int | str, started: float) -> None:
        """Count the attempt in the metrics, and log it in one INFO line."""
        record_calendar_call(call.method, status)
        duration_ms = (time.monotonic() - started) * 1000

        logger.info(
            "%s calendar=%s event=%s status=%s duration_ms=%.0f",
            call.method,
            call.target.calendar_id,
            call.event_id or "-",
            status,
            duration_ms,
            extra={
                "action": call.method.split(" ", 1)[0],
                "calendar": call.target.calendar_id,
                "event_id": call.event_id,
                "status": status,
                "duration_ms": round(duration_ms, 1),
            },
        )

    def _map_http_error(self, error: HttpError, call: _Call) -> CalendarError:
        """Turn an HTTP error of the API into the calendar error the worker acts on."""
        status = error.status_code
        reason = error_reason(error)
        message = error.reason or f"HTTP {status}"
        retry_after = parse_retry_after(error.resp.get("retry-after"))
        where = call.describe()
        user = call.target.acting_user or self._credentials.principal
        details: dict[str, Any] = {
            "status": status,
            "reason": reason,
            "calendar_id": call.target.calendar_id,
        }

        if status == 409:
            return EventAlreadyExistsError(
                f"{where}: the calendar already has an event with this id ({message})", **details
            )

        if status in (404, 410) and call.on_event:
            return EventGoneError(
                f"{where}: the event is not in the calendar or was deleted ({message})", **details
            )

        if status == 404:
            return CalendarNotFoundError(
                f"{where}: the calendar was not found, or is not shared with {user} "
                f"({message}). Check the calendar id and give {user} access to it",
                **details,
            )

        if status == 429 or (status == 403 and reason in RATE_LIMIT_REASONS):
            return RateLimitedError(
                f"{where} was rate-limited: {message}", retry_after=retry_after, **details
            )

        if status == 403 and reason in QUOTA_REASONS:
            pause = max(retry_after or 0.0, self._quota_retry_after)
            return RateLimitedError(
                f"{where}: a usage quota is exhausted ({message}), so calls for {user} pause "
                f"for {pause:.0f} s",
                retry_after=pause,
                **details,
            )

        if status >= 500:
            return TransientCalendarError(
                f"{where} failed with a server error: {message}", retry_after=retry_after, **details
            )

        if status == 401:
            return PermanentCalendarError(
                f"{where}: the API rejected the access token of {user} even after a refresh "
                f"({message}). Check the credentials file {self._credentials.path}",
                **details,
            )

        if status == 403:
            return PermanentCalendarError(
                f"{where} is forbidden: {message}. {_forbidden_advice(reason, user)}", **details
            )

        return PermanentCalendarError(f"{where} failed: {message}", **details)


class _BuiltResources:
    """A discovery client whose `events()` resource is built once instead of on every call.

    Each `events()` call of google-api-python-client 2.202 builds a new resource object with
    every method and its docstring, which took 1.6 ms of CPU on the 2-core bench VM, more than
    the HTTP request itself. The methods of one resource object can be called again and again.
    """

    def __init__(self, client: Any) -> None:
        self._events = client.events()

    def events(self) -> Any:
        return self._events


def _forbidden_advice(reason: str | None, user: str) -> str:
    """Return what an operator can do about a 403 that is not a rate or quota limit."""
    if reason == "forbiddenForServiceAccounts":
        return (
            "A service account cannot make this change as itself. Set an acting user and "
            "grant the service account domain-wide delegation"
        )
    return f'Check that {user} has "Make changes to events" access to the calendar'


def error_reason(error: HttpError) -> str | None:
    """Return the machine-readable reason of an API error, such as "rateLimitExceeded".

    The reason is read from `error.errors[0].reason` of the response body first, because
    HttpError.error_details contains the newer `error.details` list instead when a
    response has both.
    """
    try:
        errors = json.loads(error.content)["error"]["errors"]
        reason = errors[0]["reason"]
    except (ValueError, KeyError, IndexError, TypeError):
        reason = None
    if isinstance(reason, str) and reason:
        return reason

    details = error.error_details
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, dict) and detail.get("reason"):
                return str(detail["reason"])
    return None


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Return the seconds to wait from a Retry-After header, given in seconds or as an HTTP date."""
    if not value:
        return None
    value = value.strip()

    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds) if math.isfinite(seconds) else None

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


def _quota_user(target: Target) -> str | None:
    """Return the quotaUser for a target: the acting user, hashed if longer than Google allows."""
    user = target.acting_user
    if user is None or len(user) <= QUOTA_USER_MAX_LENGTH:
        return user
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:QUOTA_USER_MAX_LENGTH]


def _remote_event(item: dict[str, Any]) -> RemoteEvent:
    return RemoteEvent(
        event_id=item.get("id", ""),
        status=item.get("status", "confirmed"),
        body=item,
        etag=item.get("etag"),
    )


def _is_booking_event(event: RemoteEvent, booking_id: str | None, show_deleted: bool) -> bool:
    """Return True if a listed event belongs in list_booking_events' result."""
    if not show_deleted and not event.is_live:
        return False

    if booking_id is None:
        return event.booking_id is not None

    # The server already filtered on the booking id. A cancelled event may come back
    # without its extended properties, and it still belongs to the booking.
    return event.booking_id in (None, booking_id)
