"""Tests of the `ics` backend against a real SQLite file and the Starlette feed route."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from icalendar import Calendar
from sqlalchemy import Engine
from sqlmodel import SQLModel, create_engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

from connector.calendars.base import (
    BOOKING_ID_PROPERTY,
    EventAlreadyExistsError,
    EventGoneError,
    PermanentCalendarError,
    Target,
)
from connector.calendars.ics import IcsCalendar, feed_routes, feed_url

CALENDAR = Target("alice@example.org")
OTHER_CALENDAR = Target("bob@example.org")


def make_body(
    booking_id: str | None = "bkg_1",
    summary: str = "Consultation",
    start: str = "2026-03-16T14:00:00Z",
    end: str = "2026-03-16T15:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    """Build an event body in the Google Calendar v3 shape."""
    body: dict[str, Any] = {
        "summary": summary,
        "start": {"dateTime": start, "timeZone": "UTC"},
        "end": {"dateTime": end, "timeZone": "UTC"},
        "status": "confirmed",
    }
    if booking_id is not None:
        body["extendedProperties"] = {"private": {BOOKING_ID_PROPERTY: booking_id}}
    body.update(extra)
    return body


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'calendar.db'}")
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def backend(engine: Engine) -> IcsCalendar:
    return IcsCalendar(engine)


@pytest.fixture
def client(backend: IcsCalendar) -> Iterator[TestClient]:
    with TestClient(Starlette(routes=feed_routes(backend))) as client:
        yield client


def parse_feed(feed: bytes | None) -> Calendar:
    assert feed is not None
    return Calendar.from_ical(feed)


def feed_events(backend: IcsCalendar, target: Target = CALENDAR) -> dict[str, Any]:
    """Render the calendar's feed and return its VEVENTs by UID."""
    calendar = parse_feed(backend.render_feed(backend.feed_token(target.calendar_id)))
    return {str(event["uid"]): event for event in calendar.walk("VEVENT")}


# Insert and get


def test_insert_returns_stored_event(backend: IcsCalendar) -> None:
    event = backend.insert_event(CALENDAR, "ev1", make_body())

    assert event.event_id == "ev1"
    assert event.status == "confirmed"
    assert event.booking_id == "bkg_1"
    assert event.etag
    assert event.body["summary"] == "Consultation"
    assert event.body["sequence"] == 0
    assert event.body["iCalUID"] == "ev1@proximity-sync"


def test_get_returns_inserted_event(backend: IcsCalendar) -> None:
    inserted = backend.insert_event(CALENDAR, "ev1", make_body())

    fetched = backend.get_event(CALENDAR, "ev1")

    assert fetched is not None
    assert fetched.body == inserted.body
    assert fetched.etag == inserted.etag


def test_get_unknown_returns_none(backend: IcsCalendar) -> None:
    assert backend.get_event(CALENDAR, "never") is None


def test_insert_defaults_status_to_confirmed(backend: IcsCalendar) -> None:
    body = make_body()
    del body["status"]

    event = backend.insert_event(CALENDAR, "ev1", body)

    assert event.status == "confirmed"


def test_insert_taken_id_raises(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    with pytest.raises(EventAlreadyExistsError) as raised:
        backend.insert_event(CALENDAR, "ev1", make_body(summary="Second"))

    assert raised.value.status == 409
    assert raised.value.calendar_id == CALENDAR.calendar_id
    assert backend.get_event(CALENDAR, "ev1").body["summary"] == "Consultation"


def test_insert_deleted_id_raises(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    backend.delete_event(CALENDAR, "ev1")

    with pytest.raises(EventAlreadyExistsError):
        backend.insert_event(CALENDAR, "ev1", make_body())


def test_insert_same_id_other_calendar(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body(summary="Alice"))
    backend.insert_event(OTHER_CALENDAR, "ev1", make_body(summary="Bob"))

    assert backend.get_event(CALENDAR, "ev1").body["summary"] == "Alice"
    assert backend.get_event(OTHER_CALENDAR, "ev1").body["summary"] == "Bob"


def test_insert_does_not_alias_caller_body(backend: IcsCalendar) -> None:
    body = make_body()
    event = backend.insert_event(CALENDAR, "ev1", body)

    body["extendedProperties"]["private"][BOOKING_ID_PROPERTY] = "changed"
    event.body["summary"] = "changed"

    stored = backend.get_event(CALENDAR, "ev1")
    assert stored.booking_id == "bkg_1"
    assert stored.body["summary"] == "Consultation"


def test_insert_ignores_server_fields(backend: IcsCalendar) -> None:
    event = backend.insert_event(
        CALENDAR, "ev1", make_body(id="other", sequence=7, etag='"forged"')
    )

    assert event.body["id"] == "ev1"
    assert event.body["sequence"] == 0
    assert event.etag != '"forged"'


@pytest.mark.parametrize(
    "changes",
    [
        {"end": None},
        {"start": {"dateTime": "yesterday"}},
        {"start": {"dateTime": "2026-03-16T14:00:00"}},
        {"start": {"dateTime": "2026-03-16T14:00:00", "timeZone": "Mars/Olympus"}},
        {"end": {"dateTime": "2026-03-16T13:00:00Z"}},
        {"end": {"date": "2026-03-17"}},
        {"status": "maybe"},
    ],
    ids=[
        "missing end",
        "unparsable time",
        "no offset no zone",
        "unknown zone",
        "end before start",
        "date mixed with dateTime",
        "unknown status",
    ],
)
def test_insert_invalid_body_raises(backend: IcsCalendar, changes: dict[str, Any]) -> None:
    body = make_body()
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value

    with pytest.raises(PermanentCalendarError) as raised:
        backend.insert_event(CALENDAR, "ev1", body)

    assert raised.value.status == 400
    assert backend.get_event(CALENDAR, "ev1") is None


def test_insert_empty_id_raises(backend: IcsCalendar) -> None:
    with pytest.raises(PermanentCalendarError):
        backend.insert_event(CALENDAR, "", make_body())


# Patch


def test_patch_replaces_top_level_keys(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body(location="Room 1"))

    event = backend.patch_event(CALENDAR, "ev1", {"summary": "Follow-up", "colorId": "5"})

    assert event.body["summary"] == "Follow-up"
    assert event.body["colorId"] == "5"
    assert event.body["location"] == "Room 1"
    assert backend.get_event(CALENDAR, "ev1").body == event.body


def test_patch_merges_private_properties(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    event = backend.patch_event(
        CALENDAR, "ev1", {"extendedProperties": {"private": {"proximityRevision": "3"}}}
    )

    private = event.body["extendedProperties"]["private"]
    assert private[BOOKING_ID_PROPERTY] == "bkg_1"
    assert private["proximityRevision"] == "3"


def test_patch_none_removes_key(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body(location="Room 1"))

    event = backend.patch_event(
        CALENDAR,
        "ev1",
        {"location": None, "extendedProperties": {"private": {BOOKING_ID_PROPERTY: None}}},
    )

    assert "location" not in event.body
    assert event.booking_id is None
    assert backend.list_booking_events(CALENDAR) == []


def test_patch_raises_sequence_and_etag(backend: IcsCalendar) -> None:
    inserted = backend.insert_event(CALENDAR, "ev1", make_body())

    first = backend.patch_event(CALENDAR, "ev1", {"summary": "One"})
    second = backend.patch_event(CALENDAR, "ev1", {"summary": "Two"})

    assert first.body["sequence"] == 1
    assert second.body["sequence"] == 2
    assert first.etag != inserted.etag
    assert second.etag != first.etag


def test_patch_without_change_keeps_sequence(backend: IcsCalendar) -> None:
    inserted = backend.insert_event(CALENDAR, "ev1", make_body())

    event = backend.patch_event(CALENDAR, "ev1", {"summary": "Consultation", "sequence": 9})

    assert event.body["sequence"] == 0
    assert event.etag == inserted.etag


def test_patch_status_to_tentative(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    event = backend.patch_event(CALENDAR, "ev1", {"status": "tentative"})

    assert event.status == "tentative"
    assert event.body["status"] == "tentative"


def test_patch_invalid_times_raises(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    with pytest.raises(PermanentCalendarError):
        backend.patch_event(CALENDAR, "ev1", {"end": {"dateTime": "2026-03-16T13:00:00Z"}})

    assert backend.get_event(CALENDAR, "ev1").body["sequence"] == 0


def test_patch_missing_event_raises_gone(backend: IcsCalendar) -> None:
    with pytest.raises(EventGoneError) as raised:
        backend.patch_event(CALENDAR, "never", {"summary": "x"})

    assert raised.value.status == 404


def test_patch_deleted_event_raises_gone(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    backend.delete_event(CALENDAR, "ev1")

    with pytest.raises(EventGoneError) as raised:
        backend.patch_event(CALENDAR, "ev1", {"summary": "x"})

    assert raised.value.status == 410
    assert backend.get_event(CALENDAR, "ev1").body["summary"] == "Consultation"


# Delete


def test_delete_is_soft(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    backend.delete_event(CALENDAR, "ev1")

    event = backend.get_event(CALENDAR, "ev1")
    assert event is not None
    assert event.status == "cancelled"
    assert event.is_live is False
    assert event.body["summary"] == "Consultation"
    assert event.body["sequence"] == 1


def test_delete_twice_is_noop(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    backend.delete_event(CALENDAR, "ev1")
    first = backend.get_event(CALENDAR, "ev1")

    backend.delete_event(CALENDAR, "ev1")

    second = backend.get_event(CALENDAR, "ev1")
    assert second.status == "cancelled"
    assert second.etag == first.etag
    assert second.body["sequence"] == first.body["sequence"]


def test_delete_unknown_is_noop(backend: IcsCalendar) -> None:
    backend.delete_event(CALENDAR, "never")

    assert backend.get_event(CALENDAR, "never") is None


# List by booking


def test_list_filters_by_booking_id(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "a1", make_body(booking_id="bkg_a"))
    backend.insert_event(CALENDAR, "a2", make_body(booking_id="bkg_a"))
    backend.insert_event(CALENDAR, "b1", make_body(booking_id="bkg_b"))
    backend.insert_event(CALENDAR, "manual", make_body(booking_id=None))
    backend.insert_event(OTHER_CALENDAR, "a3", make_body(booking_id="bkg_a"))

    of_a = backend.list_booking_events(CALENDAR, "bkg_a")
    all_bookings = backend.list_booking_events(CALENDAR)

    assert sorted(event.event_id for event in of_a) == ["a1", "a2"]
    assert sorted(event.event_id for event in all_bookings) == ["a1", "a2", "b1"]
    assert backend.list_booking_events(CALENDAR, "bkg_missing") == []


def test_list_hides_deleted_unless_asked(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "a1", make_body(booking_id="bkg_a"))
    backend.insert_event(CALENDAR, "a2", make_body(booking_id="bkg_a"))
    backend.delete_event(CALENDAR, "a2")

    live = backend.list_booking_events(CALENDAR, "bkg_a")
    with_deleted = backend.list_booking_events(CALENDAR, "bkg_a", show_deleted=True)

    assert [event.event_id for event in live] == ["a1"]
    assert sorted(event.event_id for event in with_deleted) == ["a1", "a2"]
    assert {event.event_id: event.status for event in with_deleted}["a2"] == "cancelled"


def test_list_follows_patched_booking_id(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body(booking_id="bkg_a"))

    backend.patch_event(
        CALENDAR, "ev1", {"extendedProperties": {"private": {BOOKING_ID_PROPERTY: "bkg_b"}}}
    )

    assert backend.list_booking_events(CALENDAR, "bkg_a") == []
    assert [event.event_id for event in backend.list_booking_events(CALENDAR, "bkg_b")] == ["ev1"]


# Feed contents


def test_feed_has_calendar_properties(backend: IcsCalendar) -> None:
    calendar = parse_feed(backend.render_feed(backend.feed_token(CALENDAR.calendar_id)))

    assert str(calendar["version"]) == "2.0"
    assert "proximity-sync" in str(calendar["prodid"])
    assert calendar["x-wr-calname"].to_ical() == b"alice@example.org"
    assert calendar.walk("VEVENT") == []


def test_feed_event_fields(backend: IcsCalendar) -> None:
    backend.insert_event(
        CALENDAR,
        "ev1",
        make_body(description="Booked by Carol", location="Room 1", transparency="opaque"),
    )

    event = feed_events(backend)["ev1@proximity-sync"]

    assert str(event["summary"]) == "Consultation"
    assert str(event["description"]) == "Booked by Carol"
    assert str(event["location"]) == "Room 1"
    assert event.decoded("dtstart") == datetime(2026, 3, 16, 14, 0, tzinfo=UTC)
    assert event.decoded("dtend") == datetime(2026, 3, 16, 15, 0, tzinfo=UTC)
    assert str(event["status"]) == "CONFIRMED"
    assert str(event["transp"]) == "OPAQUE"
    assert event.decoded("sequence") == 0
    assert "dtstamp" in event
    assert "last-modified" in event


def test_feed_times_are_utc(backend: IcsCalendar) -> None:
    body = make_body(start="2026-03-16T15:00:00+01:00")
    body["end"] = {"dateTime": "2026-03-16T16:00:00", "timeZone": "Europe/Berlin"}
    backend.insert_event(CALENDAR, "ev1", body)

    feed = backend.render_feed(backend.feed_token(CALENDAR.calendar_id))
    event = parse_feed(feed).walk("VEVENT")[0]

    assert b"DTSTART:20260316T140000Z" in feed
    assert b"DTEND:20260316T150000Z" in feed
    assert event.decoded("dtstart") == datetime(2026, 3, 16, 14, 0, tzinfo=UTC)


def test_feed_all_day_event(backend: IcsCalendar) -> None:
    body = make_body()
    body["start"] = {"date": "2026-03-16"}
    body["end"] = {"date": "2026-03-17"}
    backend.insert_event(CALENDAR, "ev1", body)

    event = feed_events(backend)["ev1@proximity-sync"]

    assert event.decoded("dtstart") == date(2026, 3, 16)
    assert event.decoded("dtend") == date(2026, 3, 17)


def test_feed_sequence_follows_patches(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    before = feed_events(backend)["ev1@proximity-sync"]

    backend.patch_event(CALENDAR, "ev1", {"summary": "Moved", "status": "tentative"})
    after = feed_events(backend)["ev1@proximity-sync"]

    assert before.decoded("sequence") == 0
    assert after.decoded("sequence") == 1
    assert str(after["summary"]) == "Moved"
    assert str(after["status"]) == "TENTATIVE"


def test_feed_omits_cancelled_events(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "kept", make_body())
    backend.insert_event(CALENDAR, "gone", make_body(booking_id="bkg_2"))

    backend.delete_event(CALENDAR, "gone")

    uids = set(feed_events(backend))
    assert uids == {"kept@proximity-sync"}


def test_feed_omits_other_calendars(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "alice", make_body())
    backend.insert_event(OTHER_CALENDAR, "bob", make_body())

    assert set(feed_events(backend, CALENDAR)) == {"alice@proximity-sync"}
    assert set(feed_events(backend, OTHER_CALENDAR)) == {"bob@proximity-sync"}


def test_feed_keeps_non_ascii_and_emoji(backend: IcsCalendar) -> None:
    summary = "Zoë Müller – Beratung 😀🎉, Straße; Ünïcödé " * 4
    description = "Línea 1\nLínea 2: 日本語のテキスト 👩‍⚕️"
    location = "Café Ø, Zürich"
    backend.insert_event(
        CALENDAR, "ev1", make_body(summary=summary, description=description, location=location)
    )

    feed = backend.render_feed(backend.feed_token(CALENDAR.calendar_id))
    event = parse_feed(feed).walk("VEVENT")[0]

    assert str(event["summary"]) == summary
    assert str(event["description"]) == description
    assert str(event["location"]) == location
    assert backend.get_event(CALENDAR, "ev1").body["summary"] == summary
    assert all(len(line) <= 75 for line in feed.split(b"\r\n"))


def test_feed_is_stable_without_changes(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    token = backend.feed_token(CALENDAR.calendar_id)

    assert backend.render_feed(token) == backend.render_feed(token)


# Feed tokens


def test_render_unknown_token_returns_none(backend: IcsCalendar) -> None:
    backend.feed_token(CALENDAR.calendar_id)

    assert backend.render_feed("A" * 32) is None
    assert backend.render_feed("") is None
    assert backend.render_feed("../../etc/passwd") is None


def test_token_rejects_other_case(backend: IcsCalendar) -> None:
    token = backend.feed_token(CALENDAR.calendar_id)

    assert backend.render_feed(token.swapcase()) is None


def test_tokens_differ_per_calendar(backend: IcsCalendar) -> None:
    alice = backend.feed_token(CALENDAR.calendar_id)
    bob = backend.feed_token(OTHER_CALENDAR.calendar_id)

    assert alice != bob
    assert len(alice) >= 32


def test_tokens_stable_across_instances(engine: Engine) -> None:
    first = IcsCalendar(engine).feed_token(CALENDAR.calendar_id)
    second = IcsCalendar(engine).feed_token(CALENDAR.calendar_id)

    assert first == second


def test_feeds_lists_calendars_with_events(backend: IcsCalendar) -> None:
    backend.insert_event(OTHER_CALENDAR, "ev1", make_body())
    backend.insert_event(CALENDAR, "ev2", make_body())

    feeds = backend.feeds()

    assert [calendar_id for calendar_id, _ in feeds] == [
        CALENDAR.calendar_id,
        OTHER_CALENDAR.calendar_id,
    ]
    assert dict(feeds)[CALENDAR.calendar_id] == backend.feed_token(CALENDAR.calendar_id)


def test_tokens_never_logged(backend: IcsCalendar, client: TestClient, caplog) -> None:
    caplog.set_level(logging.DEBUG)

    backend.insert_event(CALENDAR, "ev1", make_body())
    token = backend.feed_token(CALENDAR.calendar_id)
    client.get(f"/feeds/{token}.ics")
    client.get(f"/feeds/{'B' * 32}.ics")

    # httpx, the test client, logs request URLs itself, so only the connector's records count.
    connector_lines = [
        record.getMessage() for record in caplog.records if record.name.startswith("connector")
    ]
    assert connector_lines
    assert all(token not in line for line in connector_lines)


# Feed route


def test_route_serves_feed(backend: IcsCalendar, client: TestClient) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body(summary="Zoë 😀"))
    token = backend.feed_token(CALENDAR.calendar_id)

    response = client.get(f"/feeds/{token}.ics")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/calendar; charset=utf-8"
    assert "private" in response.headers["cache-control"]
    event = parse_feed(response.content).walk("VEVENT")[0]
    assert str(event["summary"]) == "Zoë 😀"


def test_route_unknown_token_404(backend: IcsCalendar, client: TestClient) -> None:
    token = backend.feed_token(CALENDAR.calendar_id)

    unknown = client.get(f"/feeds/{'A' * 32}.ics")
    malformed = client.get("/feeds/short.ics")
    other_case = client.get(f"/feeds/{token.swapcase()}.ics")

    assert unknown.status_code == 404
    assert malformed.status_code == 404
    assert other_case.status_code == 404
    assert unknown.content == malformed.content
    assert unknown.content == other_case.content
    assert token.encode() not in unknown.content


def test_route_returns_304_for_etag(backend: IcsCalendar, client: TestClient) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())
    url = f"/feeds/{backend.feed_token(CALENDAR.calendar_id)}.ics"
    etag = client.get(url).headers["etag"]

    unchanged = client.get(url, headers={"If-None-Match": etag})
    backend.patch_event(CALENDAR, "ev1", {"summary": "Moved"})
    changed = client.get(url, headers={"If-None-Match": etag})

    assert unchanged.status_code == 304
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag


def test_feed_url_joins_base() -> None:
    assert feed_url("https://sync.example.org/", "tok") == "https://sync.example.org/feeds/tok.ics"
    assert feed_url("https://example.org/sync", "tok") == "https://example.org/sync/feeds/tok.ics"


# Concurrency


def run_in_threads(count: int, work) -> list[Any]:
    """Start `work(index)` on `count` threads at once and return results or raised errors."""
    barrier = threading.Barrier(count)

    def run(index: int) -> Any:
        barrier.wait()
        try:
            return work(index)
        except Exception as error:  # noqa: BLE001 - the test inspects what each thread raised
            return error

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_inserts_all_stored(backend: IcsCalendar) -> None:
    def insert_ten(index: int) -> None:
        for number in range(10):
            backend.insert_event(
                CALENDAR, f"t{index}-{number}", make_body(booking_id=f"bkg_{index}")
            )

    results = run_in_threads(8, insert_ten)

    assert results == [None] * 8
    assert len(backend.list_booking_events(CALENDAR)) == 80
    assert len(backend.list_booking_events(CALENDAR, "bkg_3")) == 10


def test_concurrent_same_id_one_wins(backend: IcsCalendar) -> None:
    results = run_in_threads(
        8, lambda index: backend.insert_event(CALENDAR, "ev1", make_body(summary=f"n{index}"))
    )

    winners = [result for result in results if not isinstance(result, Exception)]
    losers = [result for result in results if isinstance(result, EventAlreadyExistsError)]
    assert len(winners) == 1
    assert len(losers) == 7
    assert backend.get_event(CALENDAR, "ev1").body["summary"] == winners[0].body["summary"]


def test_concurrent_patches_all_kept(backend: IcsCalendar) -> None:
    backend.insert_event(CALENDAR, "ev1", make_body())

    def patch_five(index: int) -> None:
        for number in range(5):
            private = {f"thread{index}": str(number)}
            backend.patch_event(CALENDAR, "ev1", {"extendedProperties": {"private": private}})

    results = run_in_threads(4, patch_five)

    event = backend.get_event(CALENDAR, "ev1")
    private = event.body["extendedProperties"]["private"]
    assert results == [None] * 4
    assert event.body["sequence"] == 20
    assert all(private[f"thread{index}"] == "4" for index in range(4))
    assert private[BOOKING_ID_PROPERTY] == "bkg_1"


def test_concurrent_feed_token_one_token(engine: Engine) -> None:
    results = run_in_threads(8, lambda index: IcsCalendar(engine).feed_token("new@example.org"))

    assert all(isinstance(result, str) for result in results)
    assert len(set(results)) == 1
