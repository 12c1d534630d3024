"""Tests for parsing the delivery envelope and normalizing its createdAt version."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.envelope import (
    BOOKING_EVENTS,
    EVENT_RANK,
    Envelope,
    EnvelopeError,
    normalize_timestamp,
    parse_envelope,
    parse_timestamp,
)

PAYLOAD: dict[str, Any] = {
    "id": "bkg_xyz789",
    "status": "Confirmed",
    "startTime": "2026-03-16T14:00:00Z",
    "endTime": "2026-03-16T14:30:00Z",
}

OMIT = object()


def envelope_body(event: Any = "booking.created", created_at: Any = "2026-03-16T14:05:00Z", payload: Any = PAYLOAD) -> bytes:
    """Serialize an envelope as raw UTF-8 JSON. Pass OMIT for a key to leave it out."""
    fields = {"event": event, "createdAt": created_at, "payload": payload}
    document = {key: value for key, value in fields.items() if value is not OMIT}
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def test_parse_valid_event() -> None:
    envelope = parse_envelope(envelope_body())

    assert envelope.event == "booking.created"


def test_parse_valid_version() -> None:
    envelope = parse_envelope(envelope_body())

    assert envelope.version == "2026-03-16T14:05:00.000000Z"


def test_parse_valid_payload() -> None:
    envelope = parse_envelope(envelope_body())

    assert envelope.payload == PAYLOAD


def test_parse_valid_booking_id() -> None:
    envelope = parse_envelope(envelope_body())

    assert envelope.booking_id == "bkg_xyz789"


def test_parse_matching_header_passes() -> None:
    envelope = parse_envelope(envelope_body(), "booking.created")

    assert envelope.event == "booking.created"


def test_parse_header_whitespace_stripped() -> None:
    envelope = parse_envelope(envelope_body(), "  booking.created ")

    assert envelope.event == "booking.created"


def test_parse_offset_version_converted() -> None:
    envelope = parse_envelope(envelope_body(created_at="2026-03-16T15:05:00+01:00"))

    assert envelope.version == "2026-03-16T14:05:00.000000Z"


def test_parse_non_ascii_payload_kept() -> None:
    payload = dict(PAYLOAD, invitee={"name": "Zoë Müller 🎉"}, location="Café Zürich")
    envelope = parse_envelope(envelope_body(payload=payload))

    assert envelope.payload["invitee"]["name"] == "Zoë Müller 🎉"
    assert envelope.payload["location"] == "Café Zürich"


def test_parse_escaped_unicode_decoded() -> None:
    body = b'{"event":"booking.created","createdAt":"2026-03-16T14:05:00Z","payload":{"id":"bkg_1","location":"Caf\\u00e9"}}'
    envelope = parse_envelope(body)

    assert envelope.payload["location"] == "Café"


@pytest.mark.parametrize(
    ("body", "header_event", "reason"),
    [
        (b"\xff\xfe{}", None, "not valid UTF-8"),
        (b'{"event":"booking.created","payload":{"name":"Caf\xe9"}}', None, "not valid UTF-8"),
        (b"", None, "body is empty"),
        (b" \r\n\t", None, "body is empty"),
        (b"{not json", None, "not valid JSON"),
        (b'{"event":"booking.created",}', None, "not valid JSON"),
        (b"\xef\xbb\xbf{}", None, "not valid JSON"),
        (b"[]", None, "body must be a JSON object, not an array"),
        (b'"booking.created"', None, "body must be a JSON object, not a string"),
        (b"null", None, "body must be a JSON object, not null"),
        (envelope_body(event=OMIT), None, "envelope has no event name"),
        (envelope_body(event=""), None, "envelope event name is empty"),
        (envelope_body(event=42), None, "envelope event name must be a string, not a number"),
        (envelope_body(event=None), None, "envelope has no event name"),
        (envelope_body(), "booking.cancelled", "contradicts"),
        (envelope_body(event="booking.cancelled"), "booking.created", "contradicts"),
        (envelope_body(created_at=OMIT), None, "envelope has no createdAt"),
        (envelope_body(created_at=None), None, "envelope has no createdAt"),
        (envelope_body(created_at=1773669900), None, "envelope createdAt must be a string, not a number"),
        (envelope_body(created_at=""), None, "not an ISO 8601 time"),
        (envelope_body(created_at="yesterday"), None, "not an ISO 8601 time"),
        (envelope_body(created_at="16/03/2026 14:05"), None, "not an ISO 8601 time"),
        (envelope_body(created_at="2026-03-16T25:00:00Z"), None, "not an ISO 8601 time"),
        (envelope_body(created_at="2026-02-30T14:05:00Z"), None, "not an ISO 8601 time"),
        (envelope_body(created_at="2026-03-16T14:05:00+24:00"), None, "not an ISO 8601 time"),
        (envelope_body(payload=OMIT), None, "envelope has no payload"),
        (envelope_body(payload=None), None, "envelope has no payload"),
        (envelope_body(payload=[PAYLOAD]), None, "envelope payload must be a JSON object, not an array"),
        (envelope_body(payload="bkg_xyz789"), None, "envelope payload must be a JSON object, not a string"),
        (envelope_body(payload={"status": "Confirmed"}), None, "booking.created payload has no booking id"),
        (envelope_body(payload={"id": ""}), None, "booking.created payload id is empty"),
        (envelope_body(payload={"id": "   "}), None, "booking.created payload id is empty"),
        (envelope_body(payload={"id": 12345}), None, "booking.created payload id must be a string, not a number"),
        (envelope_body(payload={"id": True}), None, "booking.created payload id must be a string, not a boolean"),
        (envelope_body(payload={"id": {"value": "bkg_1"}}), None, "booking.created payload id must be a string, not an object"),
        (envelope_body(payload={"id": None}), None, "booking.created payload has no booking id"),
        (envelope_body(event="booking.cancelled", payload={}), None, "booking.cancelled payload has no booking id"),
    ],
    ids=[
        "invalid-utf8",
        "latin1-byte",
        "empty-body",
        "whitespace-body",
        "broken-json",
        "trailing-comma",
        "utf8-bom",
        "array",
        "string",
        "null",
        "event-missing",
        "event-empty",
        "event-number",
        "event-null",
        "header-contradicts",
        "header-contradicts-cancel",
        "created-at-missing",
        "created-at-null",
        "created-at-number",
        "created-at-empty",
        "created-at-words",
        "created-at-day-first",
        "created-at-hour-25",
        "created-at-february-30",
        "created-at-offset-24h",
        "payload-missing",
        "payload-null",
        "payload-array",
        "payload-string",
        "id-missing",
        "id-empty",
        "id-blank",
        "id-number",
        "id-boolean",
        "id-object",
        "id-null",
        "cancel-without-id",
    ],
)
def test_parse_invalid_raises(body: bytes, header_event: str | None, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(body, header_event)

    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is empty"),
        (envelope_body(payload={"id": 5}), "booking.created payload id must be a string, not a number"),
        (envelope_body(payload=[PAYLOAD]), "envelope payload must be a JSON object, not an array"),
    ],
)
def test_parse_fast_path_same_reason(body: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(body, exact_numbers=False)

    assert str(caught.value) == reason


def test_parse_contradiction_names_both() -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(envelope_body(), "booking.cancelled")

    assert "'booking.cancelled'" in str(caught.value)
    assert "'booking.created'" in str(caught.value)


def test_parse_bad_created_at_named() -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(envelope_body(created_at="yesterday"))

    assert "'yesterday'" in str(caught.value)


def test_envelope_error_is_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


def test_parse_unknown_event_without_id() -> None:
    envelope = parse_envelope(envelope_body(event="booking.paid", payload={"amount": 40}))

    assert envelope.event == "booking.paid"
    assert envelope.booking_id is None
    assert envelope.is_known_event is False
    assert envelope.rank == 0


def test_parse_unknown_event_keeps_id() -> None:
    envelope = parse_envelope(envelope_body(event="booking.paid", payload={"id": "bkg_xyz789"}))

    assert envelope.booking_id == "bkg_xyz789"
    assert envelope.is_known_event is False


def test_parse_unknown_event_blank_id_dropped() -> None:
    envelope = parse_envelope(envelope_body(event="ping", payload={"id": "  "}))

    assert envelope.booking_id is None


@pytest.mark.parametrize("event", BOOKING_EVENTS)
def test_parse_known_event_is_known(event: str) -> None:
    envelope = parse_envelope(envelope_body(event=event))

    assert envelope.is_known_event is True
    assert envelope.rank == EVENT_RANK[event]


def test_event_rank_covers_booking_events() -> None:
    assert set(EVENT_RANK) == set(BOOKING_EVENTS)


@pytest.mark.parametrize("ending", ["booking.cancelled", "booking.declined"])
@pytest.mark.parametrize("starting", ["booking.created", "booking.rescheduled", "booking.approved"])
def test_event_rank_ending_outranks_starting(ending: str, starting: str) -> None:
    assert EVENT_RANK[ending] > EVENT_RANK[starting]


@pytest.mark.parametrize("ending", ["booking.cancelled", "booking.declined"])
@pytest.mark.parametrize("outcome", ["booking.noShow", "booking.completed"])
def test_event_rank_ending_outranks_outcome(ending: str, outcome: str) -> None:
    assert EVENT_RANK[ending] > EVENT_RANK[outcome]


def test_event_rank_reschedule_outranks_create() -> None:
    assert EVENT_RANK["booking.rescheduled"] > EVENT_RANK["booking.created"]


def test_envelope_rank_unknown_is_zero() -> None:
    envelope = Envelope(event="meeting.ended", version="2026-03-16T14:05:00.000000Z", payload={}, booking_id=None)

    assert envelope.rank == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-16T14:05:00Z", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T14:05:00z", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T14:05:00+00:00", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T15:05:00+01:00", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T09:35:00-04:30", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T22:30:00-05:00", "2026-03-17T03:30:00.000000Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00.000000Z"),
        ("2026-03-16T14:05:00", "2026-03-16T14:05:00.000000Z"),
        ("2026-03-16T14:05:00.5Z", "2026-03-16T14:05:00.500000Z"),
        ("2026-03-16T14:05:00.123Z", "2026-03-16T14:05:00.123000Z"),
        ("2026-03-16T14:05:00.123456Z", "2026-03-16T14:05:00.123456Z"),
        (" 2026-03-16T14:05:00Z\n", "2026-03-16T14:05:00.000000Z"),
    ],
    ids=[
        "utc-z",
        "utc-lowercase-z",
        "utc-offset",
        "plus-one-hour",
        "minus-half-hour-offset",
        "crosses-day",
        "crosses-year",
        "no-offset-is-utc",
        "tenths",
        "millis",
        "micros",
        "surrounding-whitespace",
    ],
)
def test_normalize_timestamp_values(text: str, expected: str) -> None:
    assert normalize_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "now", "2026-13-01T00:00:00Z", "2026-03-16T14:60:00Z", "2026-03-16T14:05:00+25:00", "1773669900"],
    ids=["empty", "word", "month-13", "minute-60", "offset-25h", "epoch-seconds"],
)
def test_normalize_timestamp_invalid_none(text: str) -> None:
    assert normalize_timestamp(text) is None


def test_normalize_offset_equals_utc() -> None:
    assert normalize_timestamp("2026-03-16T15:05:00+01:00") == normalize_timestamp("2026-03-16T14:05:00Z")


def test_normalize_fraction_after_whole_second() -> None:
    # As raw text "...00Z" sorts after "...00.5Z" because "Z" > ".", which is the wrong order.
    earlier = normalize_timestamp("2026-03-16T14:05:00Z")
    later = normalize_timestamp("2026-03-16T14:05:00.5Z")

    assert earlier < later


def test_normalize_fractions_order() -> None:
    earlier = normalize_timestamp("2026-03-16T14:05:00.05Z")
    later = normalize_timestamp("2026-03-16T14:05:00.1Z")

    assert earlier < later


def test_normalize_offset_order() -> None:
    # As raw text "15:05+01:00" sorts after "14:06Z", but it is one minute earlier.
    earlier = normalize_timestamp("2026-03-16T15:05:00+01:00")
    later = normalize_timestamp("2026-03-16T14:06:00Z")

    assert earlier < later


def test_parse_timestamp_returns_utc() -> None:
    moment = parse_timestamp("2026-03-16T15:05:00+01:00")

    assert moment == datetime(2026, 3, 16, 14, 5, tzinfo=UTC)
    assert moment.utcoffset() == timedelta(0)


OFFSETS = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 12, 30),
    timezones=OFFSETS,
)


@given(MOMENTS, MOMENTS)
def test_normalize_order_matches_time(first: datetime, second: datetime) -> None:
    first_text = normalize_timestamp(first.isoformat())
    second_text = normalize_timestamp(second.isoformat())
    expected = (first > second) - (first < second)

    assert (first_text > second_text) - (first_text < second_text) == expected


@given(MOMENTS)
def test_normalize_fixed_width(moment: datetime) -> None:
    assert len(normalize_timestamp(moment.isoformat())) == len("2026-03-16T14:05:00.000000Z")


@given(MOMENTS, OFFSETS)
def test_normalize_offset_invariant(moment: datetime, offset: timezone) -> None:
    shifted = moment.astimezone(offset)

    assert normalize_timestamp(shifted.isoformat()) == normalize_timestamp(moment.isoformat())


@given(MOMENTS)
def test_normalize_idempotent(moment: datetime) -> None:
    once = normalize_timestamp(moment.isoformat())

    assert normalize_timestamp(once) == once


def test_normalize_year_999_fixed_width() -> None:
    assert normalize_timestamp("0999-12-31T23:59:59Z") == "0999-12-31T23:59:59.000000Z"


@pytest.mark.parametrize(
    "created_at",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
    ids=["before-year-1", "after-year-9999"],
)
def test_parse_out_of_range_created_at_raises(created_at: str) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(envelope_body(created_at=created_at))


def test_parse_deep_array_raises() -> None:
    depth = 100_000
    with pytest.raises(EnvelopeError):
        parse_envelope(b"[" * depth + b"]" * depth)


def test_parse_big_integer_kept() -> None:
    body = b'{"event":"booking.created","createdAt":"2026-03-16T14:05:00Z","payload":{"id":"bkg_1","seats":123456789012345678901234567890}}'

    envelope = parse_envelope(body)

    assert envelope.payload["seats"] == 123456789012345678901234567890
    assert envelope.booking_id == "bkg_1"


@pytest.mark.parametrize("exact_numbers", [True, False])
def test_parse_nan_kept(exact_numbers: bool) -> None:
    body = b'{"event":"booking.created","createdAt":"2026-03-16T14:05:00Z","payload":{"id":"bkg_1","price":NaN}}'

    envelope = parse_envelope(body, exact_numbers=exact_numbers)

    assert envelope.payload["price"] != envelope.payload["price"]
    assert envelope.booking_id == "bkg_1"


@pytest.mark.parametrize("exact_numbers", [True, False])
def test_parse_deep_nesting_raises(exact_numbers: bool) -> None:
    body = b'{"event":"booking.created","createdAt":"2026-03-16T14:05:00Z","payload":{"id":"bkg_1","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"

    with pytest.raises(EnvelopeError, match="nested too deeply"):
        parse_envelope(body, exact_numbers=exact_numbers)


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b'{"event":"booking.created",}', b"\xef\xbb\xbf{}", b"\xff\xfe{}", b"[1, 2]"],
)
def test_parse_fast_path_same_errors(body: bytes) -> None:
    with pytest.raises(EnvelopeError) as exact:
        parse_envelope(body)
    with pytest.raises(EnvelopeError) as fast:
        parse_envelope(body, exact_numbers=False)

    assert str(fast.value) == str(exact.value)


def test_parse_fast_path_same_envelope() -> None:
    body = envelope_body(payload=dict(PAYLOAD, invitee={"name": "Zoë Müller 🎉"}))

    assert parse_envelope(body, exact_numbers=False) == parse_envelope(body)


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-16T14:05:00Z",
        "2026-03-16T14:05:00.1Z",
        "2026-03-16T14:05:00.123456Z",
        "2024-02-29T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2026-03-16T24:00:00Z",
        "2026-03-16T14:05:00.1234567Z",
        "２０２６-03-16T14:05:00Z",
    ],
    ids=["whole-second", "tenths", "micros", "leap-day", "no-leap-day", "hour-24", "seven-digits", "fullwidth-digits"],
)
def test_normalize_utc_shortcut_matches_datetime(text: str) -> None:
    # A "Z" time is rewritten as text, so the result must equal the conversion through datetime.
    moment = parse_timestamp(text)
    expected = None if moment is None else moment.isoformat(timespec="microseconds").replace("+00:00", "Z")

    assert normalize_timestamp(text) == expected
