"""Tests of the Calendar emulator through the real google-api-python-client and google-auth."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httplib2
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt
from google.auth import jwt as google_jwt
from google.auth.exceptions import RefreshError
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from googleapiclient.discovery import Resource, build
from googleapiclient.errors import HttpError

from tests.emulator import CalendarEmulator

pytest_plugins = ["tests.emulator.fixtures"]

EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"
JANE = "jane@example.com"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection or name lookup that leaves 127.0.0.1, such as a metadata-server probe."""
    original_connect = socket.socket.connect
    original_getaddrinfo = socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK_HOSTS:
            raise AssertionError(f"test tried to connect to {address!r}, outside the loopback address")
        return original_connect(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK_HOSTS:
            raise AssertionError(f"test tried to resolve {host!r}, outside the loopback address")
        return original_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def delegated_credentials(key_path: Path, subject: str = JANE) -> service_account.Credentials:
    credentials = service_account.Credentials.from_service_account_file(str(key_path), scopes=[EVENTS_SCOPE])
    return credentials.with_subject(subject)


def calendar_service(emulator: CalendarEmulator, credentials: Any) -> Resource:
    return build(
        "calendar",
        "v3",
        credentials=credentials,
        client_options={"api_endpoint": emulator.api_endpoint},
        cache_discovery=False,
    )


def event_body(
    event_id: str | None = None,
    start: str = "2024-05-01T09:00:00Z",
    end: str = "2024-05-01T10:00:00Z",
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"summary": "Consultation", "start": {"dateTime": start}, "end": {"dateTime": end}}
    if event_id is not None:
        body["id"] = event_id
    body.update(fields)
    return body


def http_error(call: Any) -> HttpError:
    """Execute a request that must fail and return its HttpError."""
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value


@pytest.fixture(scope="module")
def shared_credentials(
    calendar_emulator: CalendarEmulator, tmp_path_factory: pytest.TempPathFactory
) -> service_account.Credentials:
    """Delegated credentials for jane@example.com, loaded once because google-auth takes about 50 ms to load a key."""
    key_path = tmp_path_factory.mktemp("keys") / "service-account.json"
    calendar_emulator.make_service_account_key(key_path)
    return delegated_credentials(key_path)


@pytest.fixture
def service(emulator: CalendarEmulator, shared_credentials: service_account.Credentials) -> Resource:
    """A Calendar client acting as jane@example.com, with a copy of the shared credentials that has no token yet."""
    return calendar_service(emulator, shared_credentials.with_subject(JANE))


# ----- event operations -----


def test_round_trip_through_google_client(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_calendar("rooms@example.com", owner=JANE)
    events = service.events()

    inserted = events.insert(calendarId=JANE, body=event_body("booking00001"), sendUpdates="none").execute()
    assert inserted["id"] == "booking00001"
    assert inserted["kind"] == "calendar#event"
    assert inserted["status"] == "confirmed"
    assert inserted["organizer"]["email"] == JANE
    assert inserted["creator"]["email"] == JANE
    assert inserted["etag"].startswith('"')
    assert inserted["etag"].endswith('"')
    assert inserted["iCalUID"] == "booking00001@google.com"
    assert inserted["sequence"] == 0
    assert inserted["htmlLink"].startswith("https://")
    assert inserted["created"] == inserted["updated"]

    fetched = events.get(calendarId=JANE, eventId="booking00001").execute()
    assert fetched == inserted

    listed = events.list(calendarId=JANE).execute()
    assert [item["id"] for item in listed["items"]] == ["booking00001"]
    assert listed["kind"] == "calendar#events"

    patched = events.patch(calendarId=JANE, eventId="booking00001", body={"summary": "Moved"}).execute()
    assert patched["summary"] == "Moved"
    assert patched["etag"] != inserted["etag"]
    assert patched["updated"] >= inserted["updated"]

    moved = events.move(calendarId=JANE, eventId="booking00001", destination="rooms@example.com").execute()
    assert moved["organizer"]["email"] == "rooms@example.com"
    assert emulator.event("rooms@example.com", "booking00001")["summary"] == "Moved"
    assert emulator.event(JANE, "booking00001")["status"] == "cancelled"

    result = events.delete(calendarId="rooms@example.com", eventId="booking00001").execute()
    assert result == ""
    assert emulator.event("rooms@example.com", "booking00001")["status"] == "cancelled"

    recorded = emulator.requests
    assert [request.method for request in recorded] == ["POST", "GET", "GET", "PATCH", "POST", "DELETE"]
    assert recorded[0].query["sendUpdates"] == "none"
    assert recorded[0].calendar_id == JANE
    assert recorded[0].user == JANE
    assert recorded[4].query["destination"] == "rooms@example.com"
    assert recorded[5].status == 204


def test_insert_without_id_generates_valid_id(service: Resource) -> None:
    inserted = service.events().insert(calendarId=JANE, body=event_body()).execute()

    assert len(inserted["id"]) >= 5
    assert set(inserted["id"]) <= set("abcdefghijklmnopqrstuv0123456789")


def test_primary_is_acting_users_calendar(emulator: CalendarEmulator, service: Resource) -> None:
    service.events().insert(calendarId="primary", body=event_body("prim00001")).execute()

    assert emulator.event(JANE, "prim00001") is not None
    assert emulator.requests[0].calendar_id == JANE


def test_duplicate_id_conflicts(service: Resource) -> None:
    service.events().insert(calendarId=JANE, body=event_body("dup000001")).execute()

    error = http_error(service.events().insert(calendarId=JANE, body=event_body("dup000001")))

    assert error.status_code == 409
    assert error.reason == "The requested identifier already exists."
    assert error.error_details[0]["reason"] == "duplicate"
    assert error.error_details[0]["domain"] == "global"
    assert error.resp["content-type"].startswith("application/json")


@pytest.mark.parametrize("bad_id", ["abc", "UPPERCASE1", "with-dash01", "wxyz12345", "x" * 1025])
def test_invalid_event_id_rejected(service: Resource, bad_id: str) -> None:
    error = http_error(service.events().insert(calendarId=JANE, body=event_body(bad_id)))

    assert error.status_code == 400
    assert error.reason == "Invalid resource id value."
    assert error.error_details[0]["reason"] == "invalid"


def test_deleted_event_lifecycle(emulator: CalendarEmulator, service: Resource) -> None:
    events = service.events()
    events.insert(calendarId=JANE, body=event_body("gone00001")).execute()
    events.delete(calendarId=JANE, eventId="gone00001").execute()

    fetched = events.get(calendarId=JANE, eventId="gone00001").execute()
    assert fetched["status"] == "cancelled"

    second_delete = http_error(events.delete(calendarId=JANE, eventId="gone00001"))
    assert second_delete.status_code == 410
    assert second_delete.error_details[0]["reason"] == "deleted"
    assert second_delete.reason == "Resource has been deleted"

    patch = http_error(events.patch(calendarId=JANE, eventId="gone00001", body={"summary": "x"}))
    assert patch.status_code == 403
    assert patch.error_details[0]["reason"] == "forbidden"

    update = http_error(events.update(calendarId=JANE, eventId="gone00001", body=event_body()))
    assert update.status_code == 403

    reinsert = http_error(events.insert(calendarId=JANE, body=event_body("gone00001")))
    assert reinsert.status_code == 409
    assert reinsert.error_details[0]["reason"] == "duplicate"

    assert emulator.events(JANE) == []
    assert len(emulator.events(JANE, include_deleted=True)) == 1


def test_unknown_event_not_found(service: Resource) -> None:
    for call in (
        service.events().get(calendarId=JANE, eventId="missing01"),
        service.events().patch(calendarId=JANE, eventId="missing01", body={}),
        service.events().delete(calendarId=JANE, eventId="missing01"),
    ):
        error = http_error(call)
        assert error.status_code == 404
        assert error.error_details[0]["reason"] == "notFound"
        assert error.reason == "Not Found"


def test_stale_if_match_fails(service: Resource) -> None:
    events = service.events()
    first = events.insert(calendarId=JANE, body=event_body("etag00001")).execute()
    second = events.patch(calendarId=JANE, eventId="etag00001", body={"summary": "v2"}).execute()

    stale = events.patch(calendarId=JANE, eventId="etag00001", body={"summary": "v3"})
    stale.headers["If-Match"] = first["etag"]
    error = http_error(stale)
    assert error.status_code == 412
    assert error.error_details[0]["reason"] == "conditionNotMet"
    assert error.reason == "Precondition Failed"

    stale_delete = events.delete(calendarId=JANE, eventId="etag00001")
    stale_delete.headers["if-match"] = first["etag"]
    assert http_error(stale_delete).status_code == 412

    current = events.patch(calendarId=JANE, eventId="etag00001", body={"summary": "v3"})
    current.headers["If-Match"] = second["etag"]
    assert current.execute()["summary"] == "v3"


def test_patch_merges_nested_objects(service: Resource) -> None:
    events = service.events()
    body = event_body(
        "merge0001",
        extendedProperties={"private": {"bookingId": "b1", "room": "3"}},
        attendees=[{"email": "a@example.com"}, {"email": "b@example.com"}],
        location="Room 3",
    )
    inserted = events.insert(calendarId=JANE, body=body).execute()

    patch = {
        "extendedProperties": {"private": {"room": None, "staff": "s1"}},
        "attendees": [{"email": "c@example.com"}],
        "location": None,
        "end": {"dateTime": "2024-05-01T11:00:00Z"},
    }
    patched = events.patch(calendarId=JANE, eventId="merge0001", body=patch).execute()

    assert patched["extendedProperties"]["private"] == {"bookingId": "b1", "staff": "s1"}
    assert patched["attendees"] == [{"email": "c@example.com"}]
    assert "location" not in patched
    assert patched["start"] == inserted["start"]
    assert patched["end"] == {"dateTime": "2024-05-01T11:00:00Z"}
    assert patched["sequence"] == 1


def test_patch_into_empty_range_rejected(emulator: CalendarEmulator, service: Resource) -> None:
    service.events().insert(calendarId=JANE, body=event_body("range0001")).execute()

    error = http_error(
        service.events().patch(calendarId=JANE, eventId="range0001", body={"end": {"dateTime": "2024-05-01T08:00:00Z"}})
    )

    assert error.status_code == 400
    assert error.error_details[0]["reason"] == "timeRangeEmpty"
    assert emulator.event(JANE, "range0001")["end"] == {"dateTime": "2024-05-01T10:00:00Z"}


def test_update_replaces_event(service: Resource) -> None:
    events = service.events()
    inserted = events.insert(calendarId=JANE, body=event_body("put000001", location="Room 1")).execute()

    replaced = events.update(calendarId=JANE, eventId="put000001", body=event_body(summary="Replaced")).execute()
    assert replaced["summary"] == "Replaced"
    assert "location" not in replaced
    assert replaced["id"] == "put000001"
    assert replaced["created"] == inserted["created"]
    assert replaced["etag"] != inserted["etag"]

    error = http_error(events.update(calendarId=JANE, eventId="put000001", body={"summary": "No times"}))
    assert error.status_code == 400
    assert error.error_details[0]["reason"] == "required"


def test_insert_time_validation(service: Resource) -> None:
    missing_end = http_error(
        service.events().insert(calendarId=JANE, body={"start": {"dateTime": "2024-05-01T09:00:00Z"}})
    )
    assert missing_end.status_code == 400
    assert missing_end.error_details[0]["reason"] == "required"
    assert missing_end.reason == "Missing end time."

    reversed_range = http_error(
        service.events().insert(calendarId=JANE, body=event_body(start="2024-05-01T10:00:00Z", end="2024-05-01T09:00:00Z"))
    )
    assert reversed_range.status_code == 400
    assert reversed_range.error_details[0]["reason"] == "timeRangeEmpty"
    assert reversed_range.reason == "The specified time range is empty."

    no_zone = http_error(service.events().insert(calendarId=JANE, body=event_body(start="2024-05-01T09:00:00")))
    assert no_zone.status_code == 400
    assert no_zone.error_details[0]["reason"] == "required"

    zoned = {"start": {"dateTime": "2024-05-01T09:00:00", "timeZone": "Europe/Berlin"}, "end": {"dateTime": "2024-05-01T10:00:00", "timeZone": "Europe/Berlin"}}
    assert service.events().insert(calendarId=JANE, body=zoned).execute()["start"]["timeZone"] == "Europe/Berlin"

    all_day = {"start": {"date": "2024-05-01"}, "end": {"date": "2024-05-02"}}
    assert service.events().insert(calendarId=JANE, body=all_day).execute()["start"] == {"date": "2024-05-01"}


# ----- calendar access -----


def test_unknown_calendar_not_found(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.auto_user_calendars = False

    error = http_error(service.events().insert(calendarId=JANE, body=event_body()))

    assert error.status_code == 404
    assert error.error_details[0]["reason"] == "notFound"


def test_calendar_not_shared_not_found(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_calendar("bob@example.com", owner="bob@example.com")
    emulator.add_calendar("team@example.com", owner="bob@example.com", shared_with=[JANE])

    error = http_error(service.events().list(calendarId="bob@example.com"))
    assert error.status_code == 404
    assert error.error_details[0]["reason"] == "notFound"

    service.events().insert(calendarId="team@example.com", body=event_body("shared001")).execute()
    assert emulator.event("team@example.com", "shared001")["creator"]["email"] == JANE


def test_calendar_shared_without_owner(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_calendar("desk@example.com", shared_with=[JANE])
    emulator.add_calendar("closed@example.com", shared_with=["bob@example.com"])
    emulator.add_calendar("open@example.com")

    assert service.calendars().get(calendarId="desk@example.com").execute()["id"] == "desk@example.com"
    assert service.calendars().get(calendarId="open@example.com").execute()["id"] == "open@example.com"
    assert http_error(service.calendars().get(calendarId="closed@example.com")).status_code == 404


def test_calendar_id_with_slash_is_decoded(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_calendar("odd/name@group.calendar.google.com")

    service.events().insert(calendarId="odd/name@group.calendar.google.com", body=event_body("slash0001")).execute()

    assert emulator.event("odd/name@group.calendar.google.com", "slash0001") is not None


# ----- listing -----


def test_private_property_filter_and_show_deleted(emulator: CalendarEmulator, service: Resource) -> None:
    events = service.events()
    for event_id, booking, room in (("prop00001", "b1", "1"), ("prop00002", "b2", "1"), ("prop00003", "b3", "2")):
        properties = {"private": {"bookingId": booking, "room": room}}
        events.insert(calendarId=JANE, body=event_body(event_id, extendedProperties=properties)).execute()
    events.delete(calendarId=JANE, eventId="prop00002").execute()

    by_room = events.list(calendarId=JANE, privateExtendedProperty="room=1").execute()
    assert [item["id"] for item in by_room["items"]] == ["prop00001"]

    with_deleted = events.list(calendarId=JANE, privateExtendedProperty="room=1", showDeleted=True).execute()
    assert [item["id"] for item in with_deleted["items"]] == ["prop00001", "prop00002"]
    assert with_deleted["items"][1]["status"] == "cancelled"

    both = events.list(calendarId=JANE, privateExtendedProperty=["room=2", "bookingId=b3"]).execute()
    assert [item["id"] for item in both["items"]] == ["prop00003"]

    none = events.list(calendarId=JANE, privateExtendedProperty=["room=2", "bookingId=b1"]).execute()
    assert none["items"] == []

    assert emulator.requests[-1].query["privateExtendedProperty"] == ["room=2", "bookingId=b1"]


def test_list_time_window_and_search(service: Resource) -> None:
    events = service.events()
    events.insert(calendarId=JANE, body=event_body("morning01", "2024-05-01T08:00:00Z", "2024-05-01T09:00:00Z")).execute()
    events.insert(calendarId=JANE, body=event_body("noon00001", "2024-05-01T12:00:00Z", "2024-05-01T13:00:00Z", summary="Dental check")).execute()
    events.insert(calendarId=JANE, body=event_body("late00001", "2024-05-01T18:00:00Z", "2024-05-01T19:00:00Z")).execute()

    window = events.list(calendarId=JANE, timeMin="2024-05-01T09:00:00Z", timeMax="2024-05-01T18:00:00Z").execute()
    assert [item["id"] for item in window["items"]] == ["noon00001"]

    found = events.list(calendarId=JANE, q="dental").execute()
    assert [item["id"] for item in found["items"]] == ["noon00001"]


def test_list_pages_and_sync_token(emulator: CalendarEmulator, service: Resource) -> None:
    events = service.events()
    for number in range(5):
        events.insert(calendarId=JANE, body=event_body(f"page0000{number}", f"2024-05-0{number + 1}T09:00:00Z", f"2024-05-0{number + 1}T10:00:00Z")).execute()

    seen: list[str] = []
    request = events.list(calendarId=JANE, maxResults=2)
    pages = 0
    response: dict[str, Any] = {}
    while request is not None:
        response = request.execute()
        seen.extend(item["id"] for item in response["items"])
        pages += 1
        request = events.list_next(request, response)
    assert seen == [f"page0000{number}" for number in range(5)]
    assert pages == 3
    assert "nextSyncToken" in response

    events.patch(calendarId=JANE, eventId="page00001", body={"summary": "Changed"}).execute()
    events.delete(calendarId=JANE, eventId="page00003").execute()
    changes = events.list(calendarId=JANE, syncToken=response["nextSyncToken"]).execute()
    assert sorted(item["id"] for item in changes["items"]) == ["page00001", "page00003"]

    emulator.invalidate_sync_tokens()
    expired = http_error(events.list(calendarId=JANE, syncToken=changes["nextSyncToken"]))
    assert expired.status_code == 410
    assert expired.error_details[0]["reason"] == "fullSyncRequired"


def test_long_list_sent_as_post_override(emulator: CalendarEmulator, service: Resource) -> None:
    long_value = "v" * 2100
    properties = {"private": {"note": long_value}}
    service.events().insert(calendarId=JANE, body=event_body("long00001", extendedProperties=properties)).execute()

    listed = service.events().list(calendarId=JANE, privateExtendedProperty=f"note={long_value}").execute()

    assert [item["id"] for item in listed["items"]] == ["long00001"]
    recorded = emulator.requests[-1]
    assert recorded.method == "GET"
    assert recorded.headers["x-http-method-override"] == "GET"
    assert recorded.query["privateExtendedProperty"] == f"note={long_value}"


# ----- direct state changes -----


def test_direct_changes_visible_to_client(emulator: CalendarEmulator, service: Resource) -> None:
    created = emulator.insert_event_directly(JANE, event_body("host00001"))
    assert service.events().get(calendarId=JANE, eventId="host00001").execute()["etag"] == created["etag"]

    edited = emulator.patch_event_directly(JANE, "host00001", {"summary": "Host edit"})
    assert edited["etag"] != created["etag"]
    assert service.events().get(calendarId=JANE, eventId="host00001").execute()["summary"] == "Host edit"

    emulator.delete_event_directly(JANE, "host00001")
    assert service.events().get(calendarId=JANE, eventId="host00001").execute()["status"] == "cancelled"
    assert service.events().list(calendarId=JANE).execute()["items"] == []

    with pytest.raises(KeyError):
        emulator.patch_event_directly(JANE, "missing01", {})


def test_reset_forgets_state(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.insert_event_directly(JANE, event_body("reset0001"))
    emulator.add_fault(times=None)
    emulator.auto_user_calendars = False
    emulator.latency = 0.5

    emulator.reset()

    assert emulator.events(JANE, include_deleted=True) == []
    assert emulator.requests == []
    assert emulator.auto_user_calendars is True
    assert emulator.latency == 0.0
    assert service.events().list(calendarId=JANE).execute()["items"] == []


# ----- faults -----


def test_fault_before_commit(emulator: CalendarEmulator, service: Resource) -> None:
    fault = emulator.add_fault(method="POST", path_contains="/events", status=503, retry_after=7)

    error = http_error(service.events().insert(calendarId=JANE, body=event_body("fault0001")))

    assert error.status_code == 503
    assert error.error_details[0]["reason"] == "backendError"
    assert error.resp["retry-after"] == "7"
    assert emulator.event(JANE, "fault0001") is None
    assert fault.hits == 1
    assert emulator.requests[-1].fault is fault

    service.events().insert(calendarId=JANE, body=event_body("fault0001")).execute()
    assert emulator.event(JANE, "fault0001") is not None


def test_fault_after_commit(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_fault(method="POST", status=500, reason="internalError", after_commit=True)

    error = http_error(service.events().insert(calendarId=JANE, body=event_body("lost00001")))
    assert error.status_code == 500
    assert emulator.event(JANE, "lost00001") is not None

    retry = http_error(service.events().insert(calendarId=JANE, body=event_body("lost00001")))
    assert retry.status_code == 409


def test_rate_limit_fault_shape(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_fault(status=403, reason="rateLimitExceeded", calendar_id=JANE, times=2)

    first = http_error(service.events().list(calendarId=JANE))
    second = http_error(service.events().list(calendarId="primary"))

    assert first.status_code == 403
    assert first.error_details[0]["reason"] == "rateLimitExceeded"
    assert first.error_details[0]["domain"] == "usageLimits"
    assert first.reason == "Rate Limit Exceeded"
    assert second.status_code == 403
    assert service.events().list(calendarId=JANE).execute()["items"] == []


def test_fault_filters_by_method(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_fault(method="DELETE", status=503)
    service.events().insert(calendarId=JANE, body=event_body("filter001")).execute()

    error = http_error(service.events().delete(calendarId=JANE, eventId="filter001"))

    assert error.status_code == 503
    assert emulator.event(JANE, "filter001")["status"] == "confirmed"


def test_delay_fault_only_slows(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_fault(status=None, delay=0.2)

    started = time.monotonic()
    service.events().list(calendarId=JANE).execute()

    assert time.monotonic() - started >= 0.2


def test_dropped_connection(emulator: CalendarEmulator, service: Resource) -> None:
    emulator.add_fault(method="POST", status="drop", after_commit=True, times=2)

    # httplib2 sends the request a second time after the first drop, and the second is dropped too.
    with pytest.raises(http.client.RemoteDisconnected):
        service.events().insert(calendarId=JANE, body=event_body("drop00001")).execute()

    assert emulator.event(JANE, "drop00001") is not None
    assert [request.status for request in emulator.requests] == [0, 0]

    emulator.add_fault(method="GET", status="drop", times=1)
    assert service.events().get(calendarId=JANE, eventId="drop00001").execute()["id"] == "drop00001"


def test_latency_applies_to_every_call(emulator: CalendarEmulator, service: Resource) -> None:
    service.events().list(calendarId=JANE).execute()
    emulator.latency = 0.05

    started = time.monotonic()
    service.events().list(calendarId=JANE).execute()
    service.events().list(calendarId=JANE).execute()

    assert time.monotonic() - started >= 0.1


# ----- authentication -----


def test_token_requests_recorded(emulator: CalendarEmulator, service_account_key: Path) -> None:
    service = calendar_service(emulator, delegated_credentials(service_account_key))
    service.events().list(calendarId=JANE).execute()
    service.events().list(calendarId=JANE).execute()

    assert len(emulator.token_requests) == 1
    token_request = emulator.token_requests[0]
    assert token_request.grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert token_request.subject == JANE
    assert token_request.status == 200


def test_missing_token_unauthorized(emulator: CalendarEmulator) -> None:
    response = httpx.get(f"{emulator.api_endpoint}calendars/{JANE}/events")

    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == 401
    assert error["errors"][0]["reason"] == "authError"
    assert error["message"].startswith("Request had invalid authentication credentials.")
    assert emulator.requests[-1].status == 401


def test_revoked_token_refreshed_by_client(emulator: CalendarEmulator, service_account_key: Path) -> None:
    service = calendar_service(emulator, delegated_credentials(service_account_key))
    service.events().list(calendarId=JANE).execute()

    emulator.revoke_access_tokens()
    service.events().list(calendarId=JANE).execute()

    assert [request.status for request in emulator.requests] == [200, 401, 200]
    assert len(emulator.token_requests) == 2


def test_delegation_missing_rejected(emulator: CalendarEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "no-delegation.json"
    emulator.make_service_account_key(key_path, client_email="nodwd@proximity-test.iam.gserviceaccount.com", delegation=False)
    service = calendar_service(emulator, delegated_credentials(key_path))

    with pytest.raises(RefreshError) as caught:
        service.events().list(calendarId=JANE).execute()

    assert "unauthorized_client" in str(caught.value)
    assert "Client is unauthorized to retrieve access tokens" in str(caught.value)
    assert emulator.token_requests[-1].status == 401
    assert emulator.token_requests[-1].error == "unauthorized_client"
    assert emulator.requests == []


def test_set_delegation_toggles_and_limits_scopes(emulator: CalendarEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "key.json"
    document = emulator.make_service_account_key(key_path, client_email="toggle@proximity-test.iam.gserviceaccount.com")
    assert document["client_id"].isdigit()
    assert document["token_uri"] == emulator.token_uri

    emulator.set_delegation(document["client_id"], False)
    with pytest.raises(RefreshError):
        calendar_service(emulator, delegated_credentials(key_path)).events().list(calendarId=JANE).execute()

    emulator.set_delegation(document["client_id"], True, scopes=["https://www.googleapis.com/auth/calendar.readonly"])
    with pytest.raises(RefreshError):
        calendar_service(emulator, delegated_credentials(key_path)).events().list(calendarId=JANE).execute()

    emulator.set_delegation(document["client_id"], True, scopes=[EVENTS_SCOPE])
    calendar_service(emulator, delegated_credentials(key_path)).events().list(calendarId=JANE).execute()


def test_service_account_without_subject(emulator: CalendarEmulator, service_account_key: Path) -> None:
    credentials = service_account.Credentials.from_service_account_file(str(service_account_key), scopes=[EVENTS_SCOPE])
    service = calendar_service(emulator, credentials)

    service.events().list(calendarId="primary").execute()

    assert emulator.requests[-1].user == "sync@proximity-test.iam.gserviceaccount.com"
    assert emulator.token_requests[-1].subject is None


def test_unknown_client_rejected(emulator: CalendarEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "key.json"
    document = emulator.make_service_account_key(key_path)
    document["client_email"] = "stranger@other-project.iam.gserviceaccount.com"
    key_path.write_text(json.dumps(document))

    with pytest.raises(RefreshError) as caught:
        calendar_service(emulator, delegated_credentials(key_path)).events().list(calendarId=JANE).execute()

    assert "invalid_client" in str(caught.value)
    assert emulator.token_requests[-1].status == 401


def test_bad_signature_rejected(emulator: CalendarEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "key.json"
    document = emulator.make_service_account_key(key_path)
    unregistered_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    document["private_key"] = unregistered_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")
    key_path.write_text(json.dumps(document))

    with pytest.raises(RefreshError) as caught:
        calendar_service(emulator, delegated_credentials(key_path)).events().list(calendarId=JANE).execute()

    assert "invalid_grant" in str(caught.value)
    assert "Invalid JWT Signature." in str(caught.value)
    assert emulator.token_requests[-1].status == 400


@pytest.mark.parametrize(
    ("lifetime", "audience", "scope", "error"),
    [
        (-10, "https://oauth2.googleapis.com/token", EVENTS_SCOPE, "invalid_grant"),
        (7200, "https://oauth2.googleapis.com/token", EVENTS_SCOPE, "invalid_grant"),
        (3600, "https://example.com/token", EVENTS_SCOPE, "invalid_grant"),
        (3600, "https://oauth2.googleapis.com/token", "https://www.googleapis.com/auth/drive", "invalid_scope"),
    ],
    ids=["expired", "too-long", "wrong-audience", "no-calendar-scope"],
)
def test_invalid_assertion_rejected(
    emulator: CalendarEmulator, tmp_path: Path, lifetime: int, audience: str, scope: str, error: str
) -> None:
    key_path = tmp_path / "key.json"
    document = emulator.make_service_account_key(key_path)
    now = int(time.time())
    issued_at = now - 3600 if lifetime < 0 else now
    payload = {
        "iss": document["client_email"],
        "aud": audience,
        "scope": scope,
        "iat": issued_at,
        "exp": now + lifetime,
    }
    signer = crypt.RSASigner.from_service_account_file(str(key_path))
    assertion = google_jwt.encode(signer, payload).decode("ascii")

    response = httpx.post(
        emulator.token_uri,
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion},
    )

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert emulator.token_requests[-1].status == 400


def test_own_token_uri_accepted_as_audience(emulator: CalendarEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "key.json"
    document = emulator.make_service_account_key(key_path)
    now = int(time.time())
    payload = {"iss": document["client_email"], "aud": emulator.token_uri, "scope": EVENTS_SCOPE, "iat": now, "exp": now + 600}
    assertion = google_jwt.encode(crypt.RSASigner.from_service_account_file(str(key_path)), payload).decode("ascii")

    response = httpx.post(
        emulator.token_uri,
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion},
    )

    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"
    assert response.json()["expires_in"] == 3600


def test_authorized_user_refresh(emulator: CalendarEmulator, tmp_path: Path) -> None:
    path = tmp_path / "authorized-user.json"
    document = emulator.make_authorized_user_file(path, user="owner@example.com")
    assert document["type"] == "authorized_user"

    credentials = user_credentials.Credentials.from_authorized_user_file(str(path), scopes=[EVENTS_SCOPE])
    credentials = credentials.with_token_uri(document["token_uri"])
    service = calendar_service(emulator, credentials)

    service.events().insert(calendarId="owner@example.com", body=event_body("user00001")).execute()

    assert emulator.event("owner@example.com", "user00001")["creator"]["email"] == "owner@example.com"
    assert emulator.token_requests[-1].grant_type == "refresh_token"
    assert emulator.token_requests[-1].subject == "owner@example.com"


def test_wrong_refresh_token_rejected(emulator: CalendarEmulator, tmp_path: Path) -> None:
    path = tmp_path / "authorized-user.json"
    document = emulator.make_authorized_user_file(path)

    credentials = user_credentials.Credentials(
        token=None,
        refresh_token="1//not-issued",
        client_id=document["client_id"],
        client_secret=document["client_secret"],
        token_uri=document["token_uri"],
    )

    with pytest.raises(RefreshError) as caught:
        calendar_service(emulator, credentials).events().list(calendarId="owner@example.com").execute()
    assert "invalid_grant" in str(caught.value)


# ----- concurrency and lifecycle -----


def test_concurrent_clients(emulator: CalendarEmulator, shared_credentials: service_account.Credentials) -> None:
    credentials = shared_credentials.with_subject(JANE)
    calendar_service(emulator, credentials).events().list(calendarId=JANE).execute()
    errors: list[BaseException] = []

    def insert_many(worker: int) -> None:
        # httplib2 connections are not thread-safe, so every thread builds its own client.
        service = calendar_service(emulator, credentials)
        try:
            for number in range(20):
                service.events().insert(calendarId=JANE, body=event_body(f"a{worker}b{number:04d}")).execute()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=insert_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(emulator.events(JANE)) == 160
    assert len({event["etag"] for event in emulator.events(JANE)}) == 160
    assert len(emulator.requests) == 161


def test_restart_keeps_port(tmp_path: Path) -> None:
    emulator = CalendarEmulator()
    base_url = emulator.start()
    try:
        assert emulator.start() == base_url
        key_path = tmp_path / "key.json"
        emulator.make_service_account_key(key_path)

        emulator.stop()
        assert emulator.start() == base_url

        service = calendar_service(emulator, delegated_credentials(key_path))
        assert service.events().list(calendarId=JANE).execute()["items"] == []
    finally:
        emulator.stop()


def test_plain_httplib2_drop_is_retried(emulator: CalendarEmulator, service_account_key: Path) -> None:
    credentials = delegated_credentials(service_account_key)
    service = calendar_service(emulator, credentials)
    service.events().list(calendarId=JANE).execute()
    emulator.add_fault(status="drop", times=1)

    response, _ = httplib2.Http().request(
        f"{emulator.api_endpoint}calendars/{JANE}/events",
        "GET",
        headers={"Authorization": f"Bearer {credentials.token}"},
    )

    assert response.status == 200
    assert [request.status for request in emulator.requests] == [200, 0, 200]


def test_call_held_across_reset_is_dropped(emulator: CalendarEmulator, service_account_key: Path) -> None:
    service = calendar_service(emulator, delegated_credentials(service_account_key))
    service.events().list(calendarId=JANE).execute()
    emulator.add_fault(method="POST", status=None, delay=1.0)
    outcome: list[object] = []

    def insert() -> None:
        try:
            outcome.append(service.events().insert(calendarId=JANE, body={"summary": "held"}).execute())
        except HttpError as error:
            outcome.append(error.resp.status)

    caller = threading.Thread(target=insert)
    caller.start()
    time.sleep(0.3)
    emulator.reset()
    caller.join(timeout=10)

    assert outcome == [503]
    assert emulator.requests == []
    assert emulator.events(JANE) == []
