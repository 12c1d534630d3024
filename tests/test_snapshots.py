"""Tests for the booking snapshot: times, rescheduledFrom and host."""

from __future__ import annotations

from typing import Any

import pytest

from connector.snapshots import Snapshot, SnapshotError

BOOKING_ID = "bkg_xyz789"

PAYLOAD: dict[str, Any] = {
    "id": BOOKING_ID,
    "status": "Confirmed",
    "startTime": "2026-03-16T14:00:00Z",
    "endTime": "2026-03-16T14:30:00Z",
    "hostUserId": "usr_host123",
    "hostName": "Jane Doe",
    "hostEmail": "jane@example.com",
    "rescheduledFrom": None,
}

OMIT = object()


def snapshot(**changes: Any) -> Snapshot:
    """Return a snapshot of the example booking with some payload fields replaced. OMIT removes a field."""
    payload = dict(PAYLOAD)
    for key, value in changes.items():
        if value is OMIT:
            payload.pop(key, None)
        else:
            payload[key] = value
    return Snapshot(
        booking_id=BOOKING_ID,
        event="booking.created",
        version="2026-03-16T14:05:00.000000Z",
        rank=0,
        payload=payload,
        delivery_id="dlv_0001",
    )


def test_times_utc_values() -> None:
    assert snapshot().times() == ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        ("2026-03-16T15:00:00+01:00", "2026-03-16T15:30:00+01:00", ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")),
        ("2026-03-16T09:00:00-05:00", "2026-03-16T16:30:00+02:00", ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")),
        ("2026-03-16T23:30:00-02:00", "2026-03-17T00:30:00-02:00", ("2026-03-17T01:30:00Z", "2026-03-17T02:30:00Z")),
        ("2026-03-16T14:00:00", "2026-03-16T14:30:00", ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")),
        ("2026-03-16T14:00:00.750Z", "2026-03-16T14:30:00.250Z", ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")),
        ("2026-03-16T14:00:00z", "2026-03-16T14:30:00+00:00", ("2026-03-16T14:00:00Z", "2026-03-16T14:30:00Z")),
    ],
    ids=["positive-offset", "mixed-offsets", "crosses-day", "no-offset-is-utc", "fraction-dropped", "lowercase-z"],
)
def test_times_converted(start: str, end: str, expected: tuple[str, str]) -> None:
    assert snapshot(startTime=start, endTime=end).times() == expected


def test_times_zero_length_passes() -> None:
    # A booking that ends when it starts is not reversed, so the module accepts it.
    start, end = snapshot(endTime="2026-03-16T14:00:00Z").times()

    assert start == end


@pytest.mark.parametrize(
    "value",
    [OMIT, None, "", "soon", "2026-03-16T25:00:00Z", 1773669600, {"dateTime": "2026-03-16T14:00:00Z"}],
    ids=["missing", "null", "empty", "word", "hour-25", "epoch-number", "object"],
)
@pytest.mark.parametrize("key", ["startTime", "endTime"])
def test_times_invalid_raises(key: str, value: Any) -> None:
    with pytest.raises(SnapshotError) as caught:
        snapshot(**{key: value}).times()

    assert key in str(caught.value)
    assert BOOKING_ID not in str(caught.value)  # the sync's error text names the booking before it


def test_times_invalid_value_shown() -> None:
    with pytest.raises(SnapshotError) as caught:
        snapshot(startTime="soon").times()

    assert "'soon'" in str(caught.value)


def test_times_both_missing_names_start() -> None:
    with pytest.raises(SnapshotError) as caught:
        snapshot(startTime=OMIT, endTime=OMIT).times()

    assert "startTime" in str(caught.value)


def test_times_end_before_start_raises() -> None:
    with pytest.raises(SnapshotError) as caught:
        snapshot(startTime="2026-03-16T14:30:00Z", endTime="2026-03-16T14:00:00Z").times()

    assert "before it starts" in str(caught.value)
    assert "2026-03-16T14:00:00Z" in str(caught.value)
    assert "2026-03-16T14:30:00Z" in str(caught.value)


def test_times_end_before_start_offsets() -> None:
    # As text the end reads later, but 14:30+02:00 is 12:30 UTC, before the 14:00 UTC start.
    reversed_booking = snapshot(startTime="2026-03-16T15:00:00+01:00", endTime="2026-03-16T14:30:00+02:00")

    with pytest.raises(SnapshotError):
        reversed_booking.times()


def test_times_end_before_start_day() -> None:
    with pytest.raises(SnapshotError):
        snapshot(startTime="2026-03-17T09:00:00Z", endTime="2026-03-16T09:30:00Z").times()


def test_snapshot_error_is_value_error() -> None:
    assert issubclass(SnapshotError, ValueError)


def test_times_out_of_range_raises() -> None:
    with pytest.raises(SnapshotError):
        snapshot(startTime="0001-01-01T00:00:00+01:00").times()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bkg_old123", "bkg_old123"),
        ("bkg_Zoë_🎉", "bkg_Zoë_🎉"),
        (None, None),
        ("", None),
        (BOOKING_ID, None),
        (42, None),
        (["bkg_old123"], None),
        (OMIT, None),
    ],
    ids=["other-booking", "non-ascii", "null", "empty", "self-reference", "number", "list", "missing"],
)
def test_rescheduled_from_values(value: Any, expected: str | None) -> None:
    assert snapshot(rescheduledFrom=value).rescheduled_from == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "jane@example.com"),
        ({"hostEmail": OMIT}, "usr_host123"),
        ({"hostEmail": ""}, "usr_host123"),
        ({"hostEmail": None}, "usr_host123"),
        ({"hostEmail": OMIT, "hostUserId": OMIT}, "Jane Doe"),
        ({"hostEmail": 7, "hostUserId": ""}, "Jane Doe"),
        ({"hostEmail": OMIT, "hostUserId": OMIT, "hostName": OMIT}, "(unknown host)"),
        ({"hostEmail": "", "hostUserId": None, "hostName": ""}, "(unknown host)"),
    ],
    ids=["email-first", "user-id-second", "empty-email", "null-email", "name-third", "wrong-types", "none-present", "all-empty"],
)
def test_host_fallback_order(changes: dict[str, Any], expected: str) -> None:
    assert snapshot(**changes).host == expected


def test_status_returns_raw() -> None:
    assert snapshot(status="PendingApproval").status == "PendingApproval"
    assert snapshot(status=OMIT).status is None
