"""Building the calendar event body a booking snapshot calls for."""

from __future__ import annotations

from typing import Protocol

from connector.calendars.base import BOOKING_ID_PROPERTY, EventBody
from connector.decisions import BookingDecision, Presence
from connector.snapshots import Snapshot


class RenderedText(Protocol):
    summary: str
    description: str
    location: str
    color_id: str | None


def build_event_body(snapshot: Snapshot, decision: BookingDecision, text: RenderedText) -> EventBody:
    """Return the event body in the Google Calendar v3 shape; raise SnapshotError without times."""
    start, end = snapshot.times()

    body: EventBody = {
        "summary": text.summary,
        "description": text.description,
        "start": {"dateTime": start, "timeZone": "UTC"},
        "end": {"dateTime": end, "timeZone": "UTC"},
        "status": "tentative" if decision.presence is Presence.TENTATIVE else "confirmed",
        "transparency": "opaque",
        "extendedProperties": {"private": {BOOKING_ID_PROPERTY: snapshot.booking_id}},
    }
    if text.location:
        body["location"] = text.location
    if text.color_id:
        body["colorId"] = text.color_id
    return body
