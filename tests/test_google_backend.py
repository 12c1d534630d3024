"""End-to-end tests of GoogleCalendar through the real API client against the Calendar emulator."""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.calendars.base import (
    BOOKING_ID_PROPERTY,
    CalendarNotFoundError,
    EventAlreadyExistsError,
    EventGoneError,
    PermanentCalendarError,
    RateLimitedError,
    Target,
    TransientCalendarError,
)
from connector.calendars.google import GoogleCalendar, parse_retry_after
from connector.calendars.google_auth import SCOPE, CredentialsFileError, load_credentials
from connector.pacing import Pacer
from connector.retries import RetryPolicy
from tests.emulator import CalendarEmulator

USER = "ana@example.com"
TARGET = Target(calendar_id=USER, acting_user=USER)
MAX_ATTEMPTS = 4


class Waits:
    """The waits that the retry policy and the pacer asked for, recorded instead of slept."""

    def __init__(self) -> None:
        self.retry: list[float] = []
        self.pacing: list[float] = []


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def open_backend(
    emulator: CalendarEmulator, service_account_key: Path, waits: Waits
) -> Iterator[Callable[..., GoogleCalendar]]:
    """Return a factory of backends aimed at the emulator, which record waits instead of sleeping."""
    opened: list[GoogleCalendar] = []

    def open_backend(credentials_file: Path | None = None, **options: object) -> GoogleCalendar:
        settings: dict[str, object] = {
            "timeout": 5.0,
            "retry_policy": RetryPolicy(
                max_attempts=MAX_ATTEMPTS,
                base_wait=0.01,
                max_wait=0.05,
                max_total=60.0,
                sleep=waits.retry.append,
            ),
            "pacer": Pacer(600_000, 6_000_000, sleep=waits.pacing.append),
        }
        settings.update(options)
        backend = GoogleCalendar(
            credentials_file or service_account_key, emulator.api_endpoint, **settings
        )
        opened.append(backend)
        return backend

    yield open_backend

    for backend in opened:
        backend.close()


@pytest.fixture
def backend(open_backend: Callable[..., GoogleCalendar]) -> GoogleCalendar:
    return open_backend()


def booking_body(booking_id: str, summary: str = "Consultation") -> dict[str, object]:
    return {
        "summary": summary,
        "description": "Booked through Proximity",
        "start": {"dateTime": "2030-05-01T09:00:00+00:00"},
        "end": {"dateTime": "2030-05-01T10:00:00+00:00"},
        "attendees": [{"email": "client.private@example.org"}],
        "extendedProperties": {"private": {BOOKING_ID_PROPERTY: booking_id}},
    }


def api_requests(emulator: CalendarEmulator, method: str) -> list:
    return [request for request in emulator.requests if request.method == method]


def wait_for_requests(emulator: CalendarEmulator, count: int, timeout: float = 5.0) -> None:
    """Wait until the emulator has recorded `count` API calls, so none leaks into the next test."""
    deadline = time.monotonic() + timeout
    while len(emulator.requests) < count and time.monotonic() < deadline:
        time.sleep(0.02)


# ----- calls -----


def test_insert_then_get(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    inserted = backend.insert_event(TARGET, "bk00001", booking_body("B-1"))
    fetched = backend.get_event(TARGET, "bk00001")

    assert inserted.event_id == "bk00001"
    assert inserted.status == "confirmed"
    assert inserted.booking_id == "B-1"
    assert inserted.etag
    assert fetched is not None
    assert fetched.body["summary"] == "Consultation"
    assert emulator.event(USER, "bk00001") is not None


def test_get_unknown_event_is_none(backend: GoogleCalendar) -> None:
    assert backend.get_event(TARGET, "neverused") is None


def test_get_of_gone_event_is_cancelled(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    emulator.add_fault(method="GET", status=410, reason="deleted")

    fetched = backend.get_event(TARGET, "bk00040")

    assert fetched is not None
    assert fetched.event_id == "bk00040"
    assert not fetched.is_live


def test_patch_changes_given_fields(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00002", booking_body("B-2"))

    patched = backend.patch_event(TARGET, "bk00002", {"summary": "Follow-up"})

    assert patched.body["summary"] == "Follow-up"
    assert patched.body["description"] == "Booked through Proximity"
    assert emulator.event(USER, "bk00002")["summary"] == "Follow-up"


def test_delete_cancels_event(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00003", booking_body("B-3"))

    backend.delete_event(TARGET, "bk00003")
    fetched = backend.get_event(TARGET, "bk00003")

    assert emulator.event(USER, "bk00003")["status"] == "cancelled"
    assert fetched is not None
    assert not fetched.is_live


def test_delete_twice_succeeds(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00004", booking_body("B-4"))

    backend.delete_event(TARGET, "bk00004")
    backend.delete_event(TARGET, "bk00004")

    statuses = [request.status for request in api_requests(emulator, "DELETE")]
    assert statuses == [204, 410]


def test_delete_unknown_event_succeeds(backend: GoogleCalendar) -> None:
    backend.delete_event(TARGET, "neverused")


def test_insert_taken_id_raises(backend: GoogleCalendar) -> None:
    backend.insert_event(TARGET, "bk00005", booking_body("B-5"))

    with pytest.raises(EventAlreadyExistsError) as caught:
        backend.insert_event(TARGET, "bk00005", booking_body("B-5"))

    assert caught.value.status == 409
    assert caught.value.calendar_id == USER


def test_patch_host_deleted_event_is_gone(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00006", booking_body("B-6"))
    emulator.delete_event_directly(USER, "bk00006")

    with pytest.raises(EventGoneError) as caught:
        backend.patch_event(TARGET, "bk00006", {"summary": "Moved"})

    assert caught.value.status == 403
    assert "deleted" in caught.value.message
    assert [request.status for request in api_requests(emulator, "PATCH")] == [403]
    assert [request.status for request in api_requests(emulator, "GET")] == [200]


def test_patch_unknown_event_is_gone(backend: GoogleCalendar) -> None:
    with pytest.raises(EventGoneError) as caught:
        backend.patch_event(TARGET, "neverused", {"summary": "Moved"})

    assert caught.value.status == 404


def test_forbidden_patch_of_live_event_is_permanent(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    backend.insert_event(TARGET, "bk00007", booking_body("B-7"))
    emulator.add_fault(method="PATCH", status=403, reason="forbidden")

    with pytest.raises(PermanentCalendarError) as caught:
        backend.patch_event(TARGET, "bk00007", {"summary": "Moved"})

    assert not isinstance(caught.value, EventGoneError)
    assert caught.value.reason == "forbidden"
    assert "Make changes to events" in caught.value.message


def test_unknown_calendar_raises_not_found(backend: GoogleCalendar) -> None:
    target = Target(calendar_id="nobody@example.com", acting_user=USER)

    with pytest.raises(CalendarNotFoundError) as caught_insert:
        backend.insert_event(target, "bk00008", booking_body("B-8"))
    with pytest.raises(CalendarNotFoundError) as caught_list:
        backend.list_booking_events(target)

    assert caught_insert.value.calendar_id == "nobody@example.com"
    assert USER in caught_insert.value.message
    assert caught_list.value.status == 404


def test_writes_send_quota_user_and_no_updates(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    backend.insert_event(TARGET, "bk00009", booking_body("B-9"))
    backend.patch_event(TARGET, "bk00009", {"summary": "Changed"})
    backend.delete_event(TARGET, "bk00009")

    writes = [request for request in emulator.requests if request.method != "GET"]
    assert [request.method for request in writes] == ["POST", "PATCH", "DELETE"]
    for request in writes:
        assert request.query.get("sendUpdates") == "none", request.method
        assert request.query.get("quotaUser") == USER, request.method
        assert request.user == USER, request.method


def test_insert_sends_chosen_id(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00010", booking_body("B-10"))

    (insert,) = api_requests(emulator, "POST")
    assert insert.body["id"] == "bk00010"


def test_long_acting_user_gets_short_quota_user(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    user = "a.very.long.staff.member.name@clinic-with-a-long-domain.example.com"
    target = Target(calendar_id=user, acting_user=user)

    backend.insert_event(target, "bk00011", booking_body("B-11"))

    (insert,) = api_requests(emulator, "POST")
    assert len(insert.query["quotaUser"]) == 40
    assert insert.user == user


def test_list_filters_by_booking(backend: GoogleCalendar) -> None:
    backend.insert_event(TARGET, "bk00012", booking_body("B-12"))
    backend.insert_event(TARGET, "bk00013", booking_body("B-13"))

    events = backend.list_booking_events(TARGET, "B-12")

    assert [event.event_id for event in events] == ["bk00012"]


def test_list_all_keeps_only_booking_events(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    backend.insert_event(TARGET, "bk00014", booking_body("B-14"))
    backend.insert_event(TARGET, "bk00015", booking_body("B-15"))
    personal = {k: v for k, v in booking_body("unused").items() if k != "extendedProperties"}
    emulator.insert_event_directly(USER, {**personal, "id": "personal1"})

    events = backend.list_booking_events(TARGET)

    assert sorted(event.event_id for event in events) == ["bk00014", "bk00015"]


def test_list_shows_deleted_on_request(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    backend.insert_event(TARGET, "bk00016", booking_body("B-16"))
    backend.insert_event(TARGET, "bk00017", booking_body("B-16"))
    backend.delete_event(TARGET, "bk00017")

    live = backend.list_booking_events(TARGET, "B-16")
    everything = backend.list_booking_events(TARGET, "B-16", show_deleted=True)

    assert [event.event_id for event in live] == ["bk00016"]
    assert sorted(event.event_id for event in everything) == ["bk00016", "bk00017"]
    list_queries = [request.query for request in api_requests(emulator, "GET")]
    assert list_queries[0]["privateExtendedProperty"] == f"{BOOKING_ID_PROPERTY}=B-16"
    assert list_queries[0]["showDeleted"] == "false"
    assert list_queries[1]["showDeleted"] == "true"


def test_list_follows_pages(
    open_backend: Callable[..., GoogleCalendar], emulator: CalendarEmulator
) -> None:
    backend = open_backend(list_page_size=2)
    for number in range(5):
        backend.insert_event(TARGET, f"bk1000{number}", booking_body(f"B-10{number}"))

    events = backend.list_booking_events(TARGET)

    assert len(events) == 5
    lists = api_requests(emulator, "GET")
    assert len(lists) == 3
    assert "pageToken" not in lists[0].query
    assert "pageToken" in lists[1].query
    assert "pageToken" in lists[2].query


def test_move_event(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    emulator.add_calendar("team@example.com", owner="owner@example.com", shared_with=[USER])
    backend.insert_event(TARGET, "bk00018", booking_body("B-18"))

    moved = backend.move_event(TARGET, "bk00018", "team@example.com")

    assert moved.event_id == "bk00018"
    assert emulator.event("team@example.com", "bk00018")["status"] == "confirmed"
    assert emulator.event(USER, "bk00018")["status"] == "cancelled"
    (move,) = api_requests(emulator, "POST")[1:]
    assert move.query["sendUpdates"] == "none"
    assert move.query["destination"] == "team@example.com"


def test_move_unknown_event_is_gone(backend: GoogleCalendar) -> None:
    with pytest.raises(EventGoneError):
        backend.move_event(TARGET, "neverused", "team@example.com")


# ----- retries and rate limits -----


def test_server_error_then_success_is_retried(
    backend: GoogleCalendar, emulator: CalendarEmulator, waits: Waits
) -> None:
    emulator.add_fault(method="POST", status=503, reason="backendError")

    backend.insert_event(TARGET, "bk00019", booking_body("B-19"))

    assert [request.status for request in api_requests(emulator, "POST")] == [503, 200]
    assert len(waits.retry) == 1


def test_server_error_forever_raises_transient(
    backend: GoogleCalendar, emulator: CalendarEmulator, waits: Waits
) -> None:
    emulator.add_fault(method="GET", status=503, reason="backendError", times=None)

    with pytest.raises(TransientCalendarError) as caught:
        backend.get_event(TARGET, "bk00020")

    assert caught.value.status == 503
    assert caught.value.reason == "backendError"
    assert len(api_requests(emulator, "GET")) == MAX_ATTEMPTS
    assert len(waits.retry) == MAX_ATTEMPTS - 1


def test_lost_insert_response_ends_as_already_exists(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    emulator.add_fault(method="POST", status=503, after_commit=True)

    with pytest.raises(EventAlreadyExistsError):
        backend.insert_event(TARGET, "bk00021", booking_body("B-21"))

    assert emulator.event(USER, "bk00021") is not None


def test_dropped_connection_is_retried(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    emulator.add_fault(method="GET", status="drop")

    assert backend.get_event(TARGET, "neverused") is None
    assert [request.status for request in api_requests(emulator, "GET")] == [0, 404]


def test_retry_after_seconds_is_honoured(
    backend: GoogleCalendar, emulator: CalendarEmulator, waits: Waits
) -> None:
    emulator.add_fault(method="POST", status=429, reason="rateLimitExceeded", retry_after=2)

    backend.insert_event(TARGET, "bk00022", booking_body("B-22"))

    assert waits.retry == [2.0]
    # The pacer holds the user back for the same time. Its clock is real, so a little has passed.
    assert len(waits.pacing) == 1
    assert 1.5 < waits.pacing[0] <= 2.0


def test_retry_after_date_is_honoured(
    backend: GoogleCalendar, emulator: CalendarEmulator, waits: Waits
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    emulator.add_fault(method="POST", status=503, reason="backendError", retry_after=when)

    backend.insert_event(TARGET, "bk00023", booking_body("B-23"))

    assert len(waits.retry) == 1
    assert 25.0 < waits.retry[0] <= 30.0


def test_rate_limit_403_is_retried(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    emulator.add_fault(method="PATCH", status=403, reason="userRateLimitExceeded")
    backend.insert_event(TARGET, "bk00024", booking_body("B-24"))

    patched = backend.patch_event(TARGET, "bk00024", {"summary": "Later"})

    assert patched.body["summary"] == "Later"
    assert [request.status for request in api_requests(emulator, "PATCH")] == [403, 200]


def test_quota_exceeded_pauses_user(
    backend: GoogleCalendar, emulator: CalendarEmulator, waits: Waits
) -> None:
    emulator.add_fault(method="POST", status=403, reason="quotaExceeded")

    with pytest.raises(RateLimitedError) as first:
        backend.insert_event(TARGET, "bk00025", booking_body("B-25"))
    with pytest.raises(RateLimitedError) as second:
        backend.insert_event(TARGET, "bk00025", booking_body("B-25"))

    assert first.value.retry_after >= 1800
    assert first.value.reason == "quotaExceeded"
    assert second.value.retry_after > 1700
    assert "paused" in second.value.message
    assert len(api_requests(emulator, "POST")) == 1
    assert waits.retry == []


def test_bad_request_is_not_retried(backend: GoogleCalendar, emulator: CalendarEmulator) -> None:
    emulator.add_fault(method="POST", status=400, reason="badRequest", message="Invalid start time.")

    with pytest.raises(PermanentCalendarError) as caught:
        backend.insert_event(TARGET, "bk00026", booking_body("B-26"))

    assert len(emulator.requests) == 1
    assert caught.value.describe() == (
        "400 badRequest: events.insert of event bk00026 failed: Invalid start time. "
        f"(calendar {USER})"
    )


def test_service_account_forbidden_has_advice(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    emulator.add_fault(method="POST", status=403, reason="forbiddenForServiceAccounts")

    with pytest.raises(PermanentCalendarError) as caught:
        backend.insert_event(TARGET, "bk00027", booking_body("B-27"))

    assert caught.value.status == 403
    assert "domain-wide delegation" in caught.value.message
    assert len(emulator.requests) == 1


def test_rejected_token_is_refreshed_once(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    backend.insert_event(TARGET, "bk00028", booking_body("B-28"))
    emulator.revoke_access_tokens()

    assert backend.get_event(TARGET, "bk00028") is not None
    assert [request.status for request in api_requests(emulator, "GET")] == [401, 200]
    assert len(emulator.token_requests) == 2


def test_unauthenticated_after_refresh_is_permanent(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    emulator.add_fault(method="GET", status=401, reason="authError", times=None)

    with pytest.raises(PermanentCalendarError) as caught:
        backend.get_event(TARGET, "bk00029")

    assert caught.value.status == 401
    assert "after a refresh" in caught.value.message
    assert len(api_requests(emulator, "GET")) == 2


def test_timeout_is_transient(
    open_backend: Callable[..., GoogleCalendar], emulator: CalendarEmulator
) -> None:
    backend = open_backend(timeout=0.3, retry_policy=RetryPolicy.no_retries())
    backend.insert_event(TARGET, "bk00030", booking_body("B-30"))
    emulator.add_fault(method="GET", status=None, delay=1.0)

    with pytest.raises(TransientCalendarError) as caught:
        backend.get_event(TARGET, "bk00030")

    assert "timed out" in caught.value.message
    assert caught.value.calendar_id == USER
    wait_for_requests(emulator, 2)


def test_every_call_takes_a_pacing_slot(
    open_backend: Callable[..., GoogleCalendar], waits: Waits
) -> None:
    # One call per second for each user. The sleeps are only recorded, so slots are reserved
    # 1 s and 2 s ahead. The other user's call waits at most for the project's next slot
    # (10 ms apart, and a few of them, because no sleep moves the clock), not behind those
    # reserved slots.
    backend = open_backend(pacer=Pacer(60, 6000, sleep=waits.pacing.append))
    other_user = Target(calendar_id="ben@example.com", acting_user="ben@example.com")

    backend.insert_event(TARGET, "bk00041", booking_body("B-41"))
    backend.get_event(TARGET, "bk00041")
    backend.delete_event(TARGET, "bk00041")
    backend.get_event(other_user, "bk00041")

    user_waits = [wait for wait in waits.pacing if wait > 0.1]
    project_waits = [wait for wait in waits.pacing if wait <= 0.1]
    assert len(user_waits) == 2
    assert 0.5 < user_waits[0] <= 1.0
    assert 1.5 < user_waits[1] <= 2.0
    assert all(wait <= 0.04 for wait in project_waits)


def test_pacing_wait_reports_user_slot(open_backend: Callable[..., GoogleCalendar]) -> None:
    backend = open_backend(pacer=Pacer(60, 600_000))
    other_user = Target(calendar_id="ben@example.com", acting_user="ben@example.com")

    backend.insert_event(TARGET, "bk00042", booking_body("B-42"))

    assert 0.5 < backend.pacing_wait(TARGET) <= 1.0
    assert 1.5 < backend.pacing_wait(TARGET, calls_ahead=1) <= 2.0
    assert backend.pacing_wait(other_user) < 0.01


# ----- credentials -----


def test_delegation_refused_is_permanent(
    open_backend: Callable[..., GoogleCalendar], emulator: CalendarEmulator, tmp_path: Path
) -> None:
    key_path = tmp_path / "no-delegation.json"
    key = emulator.make_service_account_key(
        key_path, client_email="nodelegation@proximity-test.iam.gserviceaccount.com", delegation=False
    )
    backend = open_backend(key_path)

    with pytest.raises(PermanentCalendarError) as caught:
        backend.insert_event(TARGET, "bk00031", booking_body("B-31"))

    message = caught.value.message
    assert "Domain-wide delegation" in message
    assert key["client_id"] in message
    assert SCOPE in message
    assert caught.value.reason == "unauthorized_client"
    assert caught.value.calendar_id == USER
    assert key["private_key_id"] not in message
    assert emulator.requests == []


def test_authorized_user_file(
    open_backend: Callable[..., GoogleCalendar], emulator: CalendarEmulator, tmp_path: Path
) -> None:
    owner = "owner@example.com"
    path = tmp_path / "authorized-user.json"
    emulator.make_authorized_user_file(path, user=owner)
    backend = open_backend(path)
    target = Target(calendar_id=owner, acting_user=owner)

    backend.insert_event(target, "bk00032", booking_body("B-32"))

    assert emulator.event(owner, "bk00032") is not None
    assert [request.user for request in emulator.requests] == [owner]
    assert [request.grant_type for request in emulator.token_requests] == ["refresh_token"]
    assert backend.credentials.token_uri == emulator.token_uri


def test_unreachable_token_endpoint_is_transient(
    open_backend: Callable[..., GoogleCalendar], emulator: CalendarEmulator, tmp_path: Path
) -> None:
    key_path = tmp_path / "key.json"
    key = emulator.make_service_account_key(key_path)
    # A bound socket that never listens refuses connections, so the token request fails fast.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        key["token_uri"] = f"http://127.0.0.1:{port}/token"
        key_path.write_text(json.dumps(key))
        backend = open_backend(key_path, retry_policy=RetryPolicy.no_retries())

        with pytest.raises(TransientCalendarError) as caught:
            backend.get_event(TARGET, "bk00033")

    assert "token request" in caught.value.message
    assert emulator.requests == []


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must contain a JSON object"),
        ('{"type": "external_account"}', "must be a service-account key"),
        ('{"client_email": "a@b.c"}', "must be a service-account key"),
        ('{"type": "service_account", "client_email": "a@b.c"}', "not a usable service-account key"),
        ('{"type": "authorized_user", "client_id": "x"}', "not a usable authorized-user file"),
    ],
    ids=["missing", "not-json", "not-object", "other-type", "no-type", "key-fields", "user-fields"],
)
def test_bad_credentials_file_is_rejected(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "credentials.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(CredentialsFileError) as caught:
        load_credentials(path)

    assert str(path) in str(caught.value)
    assert problem in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_directory_credentials_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CredentialsFileError) as caught:
        GoogleCalendar(tmp_path, "http://127.0.0.1:9/calendar/v3/")

    assert "is a directory" in str(caught.value)


def test_unreadable_credentials_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_bytes(b"\xff\xfe not utf-8")

    with pytest.raises(CredentialsFileError) as caught:
        load_credentials(path)

    assert "cannot be read" in str(caught.value)


def test_broken_private_key_is_not_quoted(
    emulator: CalendarEmulator, tmp_path: Path
) -> None:
    path = tmp_path / "key.json"
    key = emulator.make_service_account_key(path)
    key["private_key"] = key["private_key"][:200] + "-----END PRIVATE KEY-----\n"
    path.write_text(json.dumps(key))

    with pytest.raises(CredentialsFileError) as caught:
        load_credentials(path)

    assert str(path) in str(caught.value)
    assert key["private_key"][40:120] not in str(caught.value)


# ----- threads and logs -----


def test_concurrent_calls_for_several_users(
    backend: GoogleCalendar, emulator: CalendarEmulator
) -> None:
    users = [f"staff{number}@example.com" for number in range(4)]
    errors: list[BaseException] = []

    def worker(thread_number: int) -> None:
        user = users[thread_number % len(users)]
        target = Target(calendar_id=user, acting_user=user)
        try:
            for cycle in range(5):
                event_id = f"bk{thread_number}c{cycle}"
                booking_id = f"B-{thread_number}-{cycle}"
                backend.insert_event(target, event_id, booking_body(booking_id))
                assert backend.get_event(target, event_id) is not None
                backend.patch_event(target, event_id, {"summary": f"Cycle {cycle}"})
                assert len(backend.list_booking_events(target, booking_id)) == 1
                backend.delete_event(target, event_id)
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    for user in users:
        cancelled = emulator.events(user, include_deleted=True)
        assert len(cancelled) == 10, user
        assert all(event["status"] == "cancelled" for event in cancelled), user
    assert len(emulator.requests) == 8 * 5 * 5
    assert all(request.status in (200, 204) for request in emulator.requests)
    # One token per delegated user, however many threads share it.
    assert len(emulator.token_requests) == len(users)


def test_debug_log_has_one_line_per_call(
    backend: GoogleCalendar, emulator: CalendarEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="connector"):
        backend.insert_event(TARGET, "bk00034", booking_body("B-34", summary="Private matter"))
        backend.get_event(TARGET, "neverused")

    call_lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "connector.calendars.google"
    ]
    assert len(call_lines) == 2
    assert call_lines[0].startswith(f"events.insert calendar={USER} event=bk00034 status=200 duration_ms=")
    assert "status=404" in call_lines[1]

    everything = "\n".join(record.getMessage() for record in caplog.records)
    assert "client.private@example.org" not in everything
    assert "Private matter" not in everything
    assert "ya29." not in everything


def test_retry_warning_names_call(
    backend: GoogleCalendar, emulator: CalendarEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.add_fault(method="POST", status=503, reason="backendError")

    with caplog.at_level(logging.WARNING, logger="connector"):
        backend.insert_event(TARGET, "bk00035", booking_body("B-35"))

    (line,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "events.insert" in line
    assert USER in line
    assert "503 backendError" in line


# ----- Retry-After parsing -----


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 60.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=lambda: 40.0) == expected
