"""Property: whatever the order, duplicates and transient calendar faults, each calendar ends with the
event that the newest snapshot of each booking calls for.

Hypothesis draws a few bookings, each a history of snapshots (some rescheduled into a new booking
id), sends them in a random order with random duplicates, optionally under random faults before or
after the calendar commits, and then compares the emulator's calendars with the newest snapshots.
One connector serves every example of a test; each example uses fresh booking ids.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.calendars.base import BOOKING_ID_PROPERTY
from tests.calendar_state import wait_settled
from tests.support import booking, signed_delivery

JANE = "jane@example.com"
OMAR = "omar@example.com"
HOSTS = {JANE: {}, OMAR: {"hostEmail": OMAR, "hostUserId": "usr_omar", "hostName": "Omar Haddad"}}
SLOTS = [("2026-04-01T09:00:00Z", "2026-04-01T09:30:00Z"), ("2026-04-02T13:00:00Z", "2026-04-02T14:00:00Z"),
         ("2026-04-03T16:15:00Z", "2026-04-03T16:45:00Z")]

# The statuses Proximity sends with each event; the connector decides by the event first.
STATUSES = {
    "booking.created": ["Confirmed", "PendingApproval"],
    "booking.rescheduled": ["Confirmed", "PendingApproval"],
    "booking.approved": ["Confirmed"],
    "booking.cancelled": ["Cancelled"],
    "booking.declined": ["Declined"],
    "booking.noShow": ["Confirmed"],
    "booking.completed": ["Confirmed"],
}
PREFIXES = {"booking.noShow": "No-show: ", "booking.completed": "Completed: "}


@dataclass(frozen=True)
class Snapshot:
    """One booking event as Proximity would send it."""

    booking_id: str
    event: str
    status: str
    slot: int
    host: str
    minute: int
    rescheduled_from: str | None = None

    @property
    def created_at(self) -> str:
        return f"2026-03-16T{10 + self.minute // 60:02d}:{self.minute % 60:02d}:00Z"

    def delivery(self, delivery_id: str):
        start, end = SLOTS[self.slot]
        payload = booking(id=self.booking_id, status=self.status, startTime=start, endTime=end,
                          rescheduledFrom=self.rescheduled_from, **HOSTS[self.host])
        return signed_delivery(self.event, payload, self.created_at, delivery_id=delivery_id)


@dataclass
class Chain:
    """A booking and, if it was rescheduled into a new id, its successor, with their snapshots."""

    original: list[Snapshot]
    successor: list[Snapshot] = field(default_factory=list)

    @property
    def final(self) -> list[Snapshot]:
        """The snapshots that decide the calendar: the successor's once it exists."""
        return self.successor or self.original


@st.composite
def histories(draw, booking_id: str, first_events, rescheduled_from: str | None = None) -> list[Snapshot]:
    events = [draw(first_events)] + draw(st.lists(st.sampled_from(list(STATUSES)), max_size=3))
    minutes = sorted(draw(st.lists(st.integers(0, 600), min_size=len(events), max_size=len(events), unique=True)))
    host = draw(st.sampled_from([JANE, JANE, OMAR]))
    snapshots = []
    for event, minute in zip(events, minutes):
        if draw(st.integers(0, 9)) == 0:
            host = OMAR if host == JANE else JANE
        snapshots.append(Snapshot(booking_id, event, draw(st.sampled_from(STATUSES[event])),
                                  draw(st.integers(0, len(SLOTS) - 1)), host, minute, rescheduled_from))
    return snapshots


@st.composite
def chains(draw) -> Chain:
    prefix = uuid.uuid4().hex[:10]
    original = draw(histories(f"bkg_{prefix}_a", st.just("booking.created")))
    successor = []
    if draw(st.booleans()):
        successor = draw(histories(f"bkg_{prefix}_b", st.sampled_from(["booking.rescheduled", "booking.created"]),
                                   rescheduled_from=original[0].booking_id))
    return Chain(original, successor)


@dataclass(frozen=True)
class Send:
    """One delivery to send: which snapshot, whether it repeats an earlier delivery, and a pause after it."""

    snapshot: int
    repeat: str | None
    settle_after: bool


@st.composite
def scenarios(draw):
    drawn = draw(st.lists(chains(), min_size=1, max_size=3))
    snapshots = [snapshot for chain in drawn for snapshot in chain.original + chain.successor]
    order = draw(st.permutations(range(len(snapshots))))
    duplicates = draw(st.lists(st.tuples(st.integers(0, len(snapshots) - 1), st.sampled_from(["same id", "new id"])),
                               max_size=3))
    sends = [Send(index, None, draw(st.booleans())) for index in order]
    for index, kind in duplicates:
        position = draw(st.integers(0, len(sends)))
        sends.insert(position, Send(index, kind, False))
    return drawn, snapshots, sends


FAULTS = st.fixed_dictionaries({
    "method": st.sampled_from(["POST", "PATCH", "DELETE", "GET"]),
    "status": st.sampled_from([500, 503, 429]),
    "after_commit": st.booleans(),
    "times": st.integers(1, 3),
})

_delivery_numbers = itertools.count(1)


def run_scenario(connector, emulator, scenario, faults=()) -> None:
    drawn, snapshots, sends = scenario
    emulator.clear_faults()
    for fault in faults:
        reason = "rateLimitExceeded" if fault["status"] == 429 else "backendError"
        emulator.add_fault(reason=reason, retry_after=0.1 if fault["status"] == 429 else None, **fault)

    sent: dict[int, object] = {}
    for step in sends:
        snapshot = snapshots[step.snapshot]
        if step.repeat is None or step.snapshot not in sent:
            delivery = snapshot.delivery(f"dlv_p{next(_delivery_numbers)}")
        elif step.repeat == "same id":
            delivery = sent[step.snapshot]
        else:
            original = sent[step.snapshot]
            delivery = type(original)(original.body, {**original.headers,
                                                      "X-Webhook-Delivery": f"dlv_p{next(_delivery_numbers)}"})
        sent.setdefault(step.snapshot, delivery)
        assert connector.send(delivery).status_code == 200
        if step.settle_after:
            wait_settled(connector)

    wait_settled(connector, timeout=60)
    emulator.clear_faults()
    assert_calendars_follow_newest(connector, emulator, drawn)


def assert_calendars_follow_newest(connector, emulator, drawn: list[Chain]) -> None:
    placed: dict[str, list[tuple[str, dict]]] = {}
    for calendar_id in (JANE, OMAR):
        for event in emulator.events(calendar_id):
            booking_id = event.get("extendedProperties", {}).get("private", {}).get(BOOKING_ID_PROPERTY)
            placed.setdefault(booking_id, []).append((calendar_id, event))

    for chain in drawn:
        final = chain.final
        newest = max(final, key=lambda snapshot: snapshot.minute)
        events = placed.get(newest.booking_id, [])
        states = [row["state"] for row in connector.deliveries(newest.booking_id)]
        context = f"newest {newest}, events {events}, deliveries {states}"
        if chain.successor:
            assert placed.get(chain.original[0].booking_id, []) == [], context
        assert set(states) <= {"applied", "stale"}, context

        if newest.event in ("booking.cancelled", "booking.declined"):
            assert events == [], context
            continue
        assert len(events) == 1, context
        calendar_id, event = events[0]
        tentative = newest.event in ("booking.created", "booking.rescheduled") and newest.status == "PendingApproval"
        assert calendar_id == newest.host, context
        assert (event["start"]["dateTime"], event["end"]["dateTime"]) == SLOTS[newest.slot], context
        assert event["status"] == ("tentative" if tentative else "confirmed"), context
        prefix = "Pending: " if tentative else PREFIXES.get(newest.event, "")
        assert event["summary"] == prefix + "30 Minute Call with Alex Johnson", context


@pytest.fixture
def connector(google_connector, emulator):
    emulator.add_calendar(JANE, owner=JANE)
    emulator.add_calendar(OMAR, owner=OMAR)
    return google_connector


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_calendar_follows_newest_snapshot(connector, emulator, scenario):
    run_scenario(connector, emulator, scenario)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(), faults=st.lists(FAULTS, min_size=1, max_size=3))
def test_calendar_follows_newest_snapshot_under_faults(connector, emulator, scenario, faults):
    run_scenario(connector, emulator, scenario, faults)
