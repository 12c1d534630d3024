"""Tests for the pure sync decisions: presence, event ids, field digests and change plans."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from connector.calendars.base import EventBody, Target
from connector.decisions import (
    NO_EVENT,
    Action,
    CurrentEvent,
    Desired,
    MappingState,
    Plan,
    Presence,
    changed_fields,
    decide_presence,
    digest_body,
    digest_fields,
    event_id_for,
    is_newer,
    plan_change,
)

# Google Calendar event ids: lowercase base32hex (a-v, 0-9), 5 to 1024 characters.
GOOGLE_EVENT_ID = re.compile(r"^[a-v0-9]{5,1024}$")

# --- decide_presence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "status", "presence", "marker"),
    [
        ("booking.created", "Confirmed", Presence.CONFIRMED, None),
        ("booking.created", "confirmed", Presence.CONFIRMED, None),
        ("booking.created", "CONFIRMED", Presence.CONFIRMED, None),
        ("booking.created", " Confirmed\n", Presence.CONFIRMED, None),
        ("booking.created", "PendingApproval", Presence.TENTATIVE, "pending"),
        ("booking.created", "pendingapproval", Presence.TENTATIVE, "pending"),
        ("booking.created", "PENDING_APPROVAL", Presence.TENTATIVE, "pending"),
        ("booking.created", "Pending", Presence.TENTATIVE, "pending"),
        ("booking.rescheduled", "Confirmed", Presence.CONFIRMED, None),
        ("booking.rescheduled", "PendingApproval", Presence.TENTATIVE, "pending"),
        ("booking.rescheduled", "Cancelled", Presence.NONE, None),
        ("booking.created", "Canceled", Presence.NONE, None),
        ("booking.created", "Declined", Presence.NONE, None),
        ("booking.created", "Rejected", Presence.NONE, None),
        ("booking.created", "NoShow", Presence.CONFIRMED, "no_show"),
        ("booking.created", "no-show", Presence.CONFIRMED, "no_show"),
        ("booking.created", "Completed", Presence.CONFIRMED, "completed"),
        ("booking.cancelled", "Confirmed", Presence.NONE, None),
        ("booking.cancelled", "Cancelled", Presence.NONE, None),
        ("booking.declined", "PendingApproval", Presence.NONE, None),
        ("booking.declined", None, Presence.NONE, None),
        ("booking.noShow", "Confirmed", Presence.CONFIRMED, "no_show"),
        ("booking.noShow", "Cancelled", Presence.CONFIRMED, "no_show"),
        ("booking.completed", "Confirmed", Presence.CONFIRMED, "completed"),
        ("booking.approved", "PendingApproval", Presence.CONFIRMED, None),
        ("booking.approved", "Confirmed", Presence.CONFIRMED, None),
        ("booking.paid", "Confirmed", Presence.CONFIRMED, None),
    ],
    ids=[
        "created-confirmed",
        "created-lowercase",
        "created-uppercase",
        "created-padded",
        "created-pending-approval",
        "created-pending-lowercase",
        "created-pending-snake",
        "created-pending-short",
        "rescheduled-confirmed",
        "rescheduled-pending",
        "rescheduled-cancelled-status",
        "created-canceled-us-spelling",
        "created-declined-status",
        "created-rejected-status",
        "created-noshow-status",
        "created-no-show-dashed",
        "created-completed-status",
        "cancelled-event-beats-confirmed",
        "cancelled-event-cancelled",
        "declined-event-beats-pending",
        "declined-event-no-status",
        "noshow-event",
        "noshow-event-beats-cancelled-status",
        "completed-event",
        "approved-event-beats-pending",
        "approved-event-confirmed",
        "unknown-event-confirmed",
    ],
)
def test_decide_presence_table(event: str, status: object, presence: Presence, marker: str | None) -> None:
    decision = decide_presence(event, status)

    assert decision.presence is presence
    assert decision.marker == marker
    assert decision.warning is None


def test_decide_unknown_status_kept() -> None:
    decision = decide_presence("booking.created", "OnHold")

    assert decision.presence is Presence.CONFIRMED
    assert decision.marker is None
    assert decision.warning is not None
    assert "'OnHold'" in decision.warning


@pytest.mark.parametrize("status", [3, ["Confirmed"], {"value": "Confirmed"}, ""], ids=["int", "list", "dict", "empty"])
def test_decide_non_string_status_warns(status: object) -> None:
    decision = decide_presence("booking.created", status)

    assert decision.presence is Presence.CONFIRMED
    assert decision.warning == f"unknown booking status {status!r}; the event is kept as confirmed"


def test_decide_missing_status_warns() -> None:
    decision = decide_presence("booking.created", None)

    assert decision.presence is Presence.CONFIRMED
    assert decision.warning == "booking has no status; the event is kept as confirmed"


def test_decide_non_string_status_cancel_event() -> None:
    decision = decide_presence("booking.cancelled", None)

    assert decision.presence is Presence.NONE
    assert decision.warning is None


# --- event_id_for ------------------------------------------------------------------------------

BOOKING_IDS = [
    "bkg_xyz789",
    "",
    "a",
    "bkg_Zoë_Müller",
    "山田-予約-1",
    "bkg_🎉🚀",
    "👩‍👩‍👧",
    "BKG_UPPER/with spaces?&=",
    "x" * 10_000,
    "\x00\n\t",
]
BOOKING_ID_LABELS = ["plain", "empty", "one-char", "latin", "cjk", "emoji", "emoji-zwj", "punctuation", "10k-chars", "control"]


@pytest.mark.parametrize("booking_id", BOOKING_IDS, ids=BOOKING_ID_LABELS)
@pytest.mark.parametrize("generation", [0, 1, 2, 99, 10**9])
def test_event_id_google_format(booking_id: str, generation: int) -> None:
    assert GOOGLE_EVENT_ID.match(event_id_for(booking_id, generation))


@pytest.mark.parametrize("booking_id", BOOKING_IDS, ids=BOOKING_ID_LABELS)
def test_event_id_deterministic(booking_id: str) -> None:
    assert event_id_for(booking_id, 1) == event_id_for(booking_id, 1)


def test_event_id_pinned_value() -> None:
    # Mappings and calendars store these ids, so a change of scheme would orphan every
    # existing event. The value is the first 32 hex digits of
    # sha256("proximity-booking:bkg_xyz789") followed by "g1", checked with sha256sum.
    assert event_id_for("bkg_xyz789", 1) == "384d941c9abe8e4d0b60816faa2fa27ag1"


def test_event_id_differs_per_generation() -> None:
    ids = {event_id_for("bkg_xyz789", generation) for generation in range(200)}

    assert len(ids) == 200


def test_event_id_generation_1_vs_11() -> None:
    assert event_id_for("bkg_xyz789", 1) != event_id_for("bkg_xyz789", 11)


def test_event_id_differs_per_booking() -> None:
    ids = {event_id_for(booking_id, 1) for booking_id in BOOKING_IDS}

    assert len(ids) == len(BOOKING_IDS)


def test_event_id_case_sensitive_booking() -> None:
    assert event_id_for("bkg_ABC", 1) != event_id_for("bkg_abc", 1)


def test_event_id_long_ids_differ_at_end() -> None:
    prefix = "x" * 5000

    assert event_id_for(prefix + "a", 1) != event_id_for(prefix + "b", 1)


@given(st.text(), st.integers(min_value=0, max_value=10**12))
def test_event_id_always_valid(booking_id: str, generation: int) -> None:
    assert GOOGLE_EVENT_ID.match(event_id_for(booking_id, generation))


@given(st.text(), st.integers(min_value=0, max_value=10**6), st.text(), st.integers(min_value=0, max_value=10**6))
def test_event_id_injective(first_id: str, first_generation: int, second_id: str, second_generation: int) -> None:
    assume((first_id, first_generation) != (second_id, second_generation))

    assert event_id_for(first_id, first_generation) != event_id_for(second_id, second_generation)


# --- digest_fields and changed_fields ----------------------------------------------------------

TARGET = Target("jane@example.com")
OTHER_TARGET = Target("team-calendar@group.calendar.google.com")

BODY: EventBody = {
    "summary": "30 Minute Call with Alex Johnson",
    "description": "Booked through the booking page.",
    "location": "https://meet.google.com/abc-defg-hij",
    "start": {"dateTime": "2026-03-16T14:00:00Z", "timeZone": "UTC"},
    "end": {"dateTime": "2026-03-16T14:30:00Z", "timeZone": "UTC"},
    "status": "confirmed",
    "extendedProperties": {"private": {"proximityBookingId": "bkg_xyz789"}},
}


def body_with(**changes: Any) -> EventBody:
    """Return a copy of BODY with some top-level fields replaced."""
    body = dict(BODY)
    body.update(changes)
    return body


def body_without(*names: str) -> EventBody:
    """Return a copy of BODY without some top-level fields."""
    return {name: value for name, value in BODY.items() if name not in names}


def test_digest_fields_keys_match_body() -> None:
    assert set(digest_fields(BODY)) == set(BODY)


def test_digest_fields_values_hex() -> None:
    for name, digest in digest_fields(BODY).items():
        assert re.fullmatch(r"[0-9a-f]{24}", digest), name


def test_digest_fields_nested_key_order() -> None:
    reordered = body_with(start={"timeZone": "UTC", "dateTime": "2026-03-16T14:00:00Z"})

    assert digest_fields(reordered) == digest_fields(BODY)


def test_digest_fields_value_change() -> None:
    changed = digest_fields(body_with(summary="Renamed"))

    assert changed["summary"] != digest_fields(BODY)["summary"]
    assert changed["location"] == digest_fields(BODY)["location"]


def test_digest_fields_non_ascii_stable() -> None:
    body = {"summary": "Call with Zoë 🎉"}

    assert digest_fields(body) == digest_fields({"summary": "Call with Zoë 🎉"})
    assert digest_fields(body) != digest_fields({"summary": "Call with Zoe 🎉"})


def test_digest_body_detects_change() -> None:
    assert digest_body(BODY) == digest_body(dict(BODY))
    assert digest_body(BODY) != digest_body(body_with(status="tentative"))


def test_changed_fields_unchanged_empty() -> None:
    assert changed_fields(digest_fields(BODY), BODY) == {}


def test_changed_fields_one_changed() -> None:
    changes = changed_fields(digest_fields(BODY), body_with(summary="Renamed call"))

    assert changes == {"summary": "Renamed call"}


def test_changed_fields_nested_changed() -> None:
    new_start = {"dateTime": "2026-03-16T15:00:00Z", "timeZone": "UTC"}
    changes = changed_fields(digest_fields(BODY), body_with(start=new_start))

    assert changes == {"start": new_start}


def test_changed_fields_removed_is_none() -> None:
    changes = changed_fields(digest_fields(BODY), body_without("location"))

    assert changes == {"location": None}


def test_changed_fields_added_field() -> None:
    changes = changed_fields(digest_fields(body_without("location")), BODY)

    assert changes == {"location": BODY["location"]}


def test_changed_fields_mixed() -> None:
    body = body_without("description")
    body["status"] = "tentative"
    body["colorId"] = "5"
    changes = changed_fields(digest_fields(BODY), body)

    assert changes == {"description": None, "status": "tentative", "colorId": "5"}


def test_changed_fields_no_digests_sends_all() -> None:
    assert changed_fields({}, BODY) == BODY


# --- plan_change -------------------------------------------------------------------------------

VERSION = "2026-03-16T14:05:00.000000Z"
EARLIER = "2026-03-16T14:04:59.999999Z"
LATER = "2026-03-16T14:10:00.000000Z"
CREATE_RANK = 0
RESCHEDULE_RANK = 1
CANCEL_RANK = 3


def live_event(booking_id: str = "bkg_xyz789", target: Target = TARGET, body: EventBody = BODY, generation: int = 1) -> CurrentEvent:
    """Return a live mapping written at VERSION by a create."""
    return CurrentEvent(
        state=MappingState.LIVE,
        target=target,
        event_id=event_id_for(booking_id, generation),
        generation=generation,
        version=VERSION,
        rank=CREATE_RANK,
        field_digests=digest_fields(body),
    )


OWN_LIVE = live_event()
OWN_DELETED = replace(live_event(), state=MappingState.DELETED, rank=CANCEL_RANK)
OWN_CARRIED_OVER = replace(live_event(), state=MappingState.CARRIED_OVER, carried_to="bkg_next")
OWN_LIVE_WITHOUT_ID = replace(live_event(), event_id=None)
PREDECESSOR_LIVE = live_event(booking_id="bkg_old")
PREDECESSOR_DELETED = replace(live_event(booking_id="bkg_old"), state=MappingState.DELETED)
NEW_BOOKING = CurrentEvent(MappingState.NONE, version=None)

WANT_BODY = Desired(TARGET, BODY)
WANT_NOTHING = Desired(TARGET, None)


@dataclass(frozen=True)
class PlanCase:
    """One row of the plan_change table and the plan it must produce."""

    label: str
    current: CurrentEvent
    version: str
    rank: int
    desired: Desired
    predecessor: tuple[str, CurrentEvent] | None
    action: Action
    base: CurrentEvent
    changes: EventBody
    takes_over_from: str | None = None


PLAN_CASES = [
    PlanCase("no-mapping-create", NO_EVENT, VERSION, CREATE_RANK, WANT_BODY, None, Action.CREATE, NO_EVENT, BODY),
    PlanCase("no-mapping-nothing-wanted", NO_EVENT, VERSION, CANCEL_RANK, WANT_NOTHING, None, Action.UNCHANGED, NO_EVENT, {}),
    PlanCase("live-same-digests", OWN_LIVE, LATER, RESCHEDULE_RANK, WANT_BODY, None, Action.UNCHANGED, OWN_LIVE, {}),
    PlanCase(
        "live-summary-changed",
        OWN_LIVE,
        LATER,
        RESCHEDULE_RANK,
        Desired(TARGET, body_with(summary="Renamed call")),
        None,
        Action.UPDATE,
        OWN_LIVE,
        {"summary": "Renamed call"},
    ),
    PlanCase(
        "live-field-removed",
        OWN_LIVE,
        LATER,
        RESCHEDULE_RANK,
        Desired(TARGET, body_without("location")),
        None,
        Action.UPDATE,
        OWN_LIVE,
        {"location": None},
    ),
    PlanCase("live-other-target", OWN_LIVE, LATER, RESCHEDULE_RANK, Desired(OTHER_TARGET, BODY), None, Action.MOVE, OWN_LIVE, BODY),
    PlanCase(
        "live-other-acting-user",
        OWN_LIVE,
        LATER,
        RESCHEDULE_RANK,
        Desired(Target(TARGET.calendar_id, "admin@example.com"), BODY),
        None,
        Action.UNCHANGED,
        OWN_LIVE,
        {},
    ),
    PlanCase("live-nothing-wanted", OWN_LIVE, LATER, CANCEL_RANK, WANT_NOTHING, None, Action.DELETE, OWN_LIVE, {}),
    PlanCase("live-without-event-id", OWN_LIVE_WITHOUT_ID, LATER, CREATE_RANK, WANT_BODY, None, Action.CREATE, OWN_LIVE_WITHOUT_ID, BODY),
    PlanCase("deleted-create", OWN_DELETED, LATER, CREATE_RANK, WANT_BODY, None, Action.CREATE, OWN_DELETED, BODY),
    PlanCase("deleted-nothing-wanted", OWN_DELETED, LATER, CANCEL_RANK, WANT_NOTHING, None, Action.UNCHANGED, OWN_DELETED, {}),
    PlanCase("older-version-stale", OWN_LIVE, EARLIER, CANCEL_RANK, WANT_NOTHING, None, Action.STALE, OWN_LIVE, {}),
    PlanCase("equal-version-rank-stale", OWN_LIVE, VERSION, CREATE_RANK, Desired(OTHER_TARGET, BODY), None, Action.STALE, OWN_LIVE, {}),
    PlanCase("equal-version-cancel-applies", OWN_LIVE, VERSION, CANCEL_RANK, WANT_NOTHING, None, Action.DELETE, OWN_LIVE, {}),
    PlanCase(
        "equal-version-reschedule-applies",
        OWN_LIVE,
        VERSION,
        RESCHEDULE_RANK,
        Desired(TARGET, body_with(summary="Moved call")),
        None,
        Action.UPDATE,
        OWN_LIVE,
        {"summary": "Moved call"},
    ),
    PlanCase("equal-version-lower-rank-stale", OWN_DELETED, VERSION, CREATE_RANK, WANT_BODY, None, Action.STALE, OWN_DELETED, {}),
    PlanCase("older-deleted-stale", OWN_DELETED, EARLIER, CREATE_RANK, WANT_BODY, None, Action.STALE, OWN_DELETED, {}),
    PlanCase("later-lower-rank-applies", OWN_DELETED, LATER, CREATE_RANK, WANT_BODY, None, Action.CREATE, OWN_DELETED, BODY),
    PlanCase("carried-over", OWN_CARRIED_OVER, LATER, CANCEL_RANK, WANT_NOTHING, None, Action.CARRIED_OVER, OWN_CARRIED_OVER, {}),
    PlanCase("carried-over-older", OWN_CARRIED_OVER, EARLIER, CREATE_RANK, WANT_BODY, None, Action.CARRIED_OVER, OWN_CARRIED_OVER, {}),
    PlanCase(
        "takeover-unchanged",
        NEW_BOOKING,
        LATER,
        RESCHEDULE_RANK,
        WANT_BODY,
        ("bkg_old", PREDECESSOR_LIVE),
        Action.UNCHANGED,
        PREDECESSOR_LIVE,
        {},
        "bkg_old",
    ),
    PlanCase(
        "takeover-update",
        NEW_BOOKING,
        LATER,
        RESCHEDULE_RANK,
        Desired(TARGET, body_with(start={"dateTime": "2026-03-17T09:00:00Z", "timeZone": "UTC"})),
        ("bkg_old", PREDECESSOR_LIVE),
        Action.UPDATE,
        PREDECESSOR_LIVE,
        {"start": {"dateTime": "2026-03-17T09:00:00Z", "timeZone": "UTC"}},
        "bkg_old",
    ),
    PlanCase(
        "takeover-move",
        NEW_BOOKING,
        LATER,
        RESCHEDULE_RANK,
        Desired(OTHER_TARGET, BODY),
        ("bkg_old", PREDECESSOR_LIVE),
        Action.MOVE,
        PREDECESSOR_LIVE,
        BODY,
        "bkg_old",
    ),
    PlanCase(
        "takeover-delete",
        NEW_BOOKING,
        LATER,
        CANCEL_RANK,
        WANT_NOTHING,
        ("bkg_old", PREDECESSOR_LIVE),
        Action.DELETE,
        PREDECESSOR_LIVE,
        {},
        "bkg_old",
    ),
    PlanCase(
        "takeover-from-own-deleted",
        OWN_DELETED,
        LATER,
        RESCHEDULE_RANK,
        WANT_BODY,
        ("bkg_old", PREDECESSOR_LIVE),
        Action.UNCHANGED,
        PREDECESSOR_LIVE,
        {},
        "bkg_old",
    ),
    PlanCase(
        "own-live-no-takeover",
        OWN_LIVE,
        LATER,
        RESCHEDULE_RANK,
        Desired(TARGET, body_with(summary="Renamed call")),
        ("bkg_old", PREDECESSOR_LIVE),
        Action.UPDATE,
        OWN_LIVE,
        {"summary": "Renamed call"},
    ),
    PlanCase(
        "own-live-delete-no-takeover",
        OWN_LIVE,
        LATER,
        CANCEL_RANK,
        WANT_NOTHING,
        ("bkg_old", PREDECESSOR_LIVE),
        Action.DELETE,
        OWN_LIVE,
        {},
    ),
    PlanCase(
        "predecessor-deleted-create",
        NEW_BOOKING,
        LATER,
        RESCHEDULE_RANK,
        WANT_BODY,
        ("bkg_old", PREDECESSOR_DELETED),
        Action.CREATE,
        NEW_BOOKING,
        BODY,
    ),
    PlanCase(
        "stale-ignores-predecessor",
        OWN_DELETED,
        EARLIER,
        RESCHEDULE_RANK,
        WANT_BODY,
        ("bkg_old", PREDECESSOR_LIVE),
        Action.STALE,
        OWN_DELETED,
        {},
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[case.label for case in PLAN_CASES])
def test_plan_change_table(case: PlanCase) -> None:
    plan = plan_change(case.current, case.version, case.rank, case.desired, case.predecessor)

    assert plan.action is case.action
    assert plan.base == case.base
    assert plan.changes == case.changes
    assert plan.takes_over_from == case.takes_over_from


def test_plan_create_copies_body() -> None:
    body = dict(BODY)
    plan = plan_change(NO_EVENT, VERSION, CREATE_RANK, Desired(TARGET, body))
    body["summary"] = "Changed after planning"

    assert plan.changes["summary"] == BODY["summary"]


def test_plan_does_not_change_inputs() -> None:
    current = live_event()
    desired = Desired(TARGET, body_with(summary="Renamed call"))
    plan_change(current, LATER, RESCHEDULE_RANK, desired, ("bkg_old", PREDECESSOR_LIVE))

    assert current == live_event()
    assert desired.body == body_with(summary="Renamed call")


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (Action.STALE, False),
        (Action.CARRIED_OVER, False),
        (Action.UNCHANGED, False),
        (Action.CREATE, True),
        (Action.UPDATE, True),
        (Action.MOVE, True),
        (Action.DELETE, True),
    ],
    ids=lambda value: value.value if isinstance(value, Action) else None,
)
def test_plan_calls_calendar(action: Action, expected: bool) -> None:
    assert Plan(action, NO_EVENT).calls_calendar is expected


@pytest.mark.parametrize(
    ("version", "rank", "expected"),
    [
        (EARLIER, CANCEL_RANK, False),
        (VERSION, CREATE_RANK, False),
        (VERSION, RESCHEDULE_RANK, True),
        (LATER, CREATE_RANK, True),
    ],
    ids=["earlier", "equal", "equal-higher-rank", "later"],
)
def test_is_newer_versions(version: str, rank: int, expected: bool) -> None:
    assert is_newer(version, rank, OWN_LIVE) is expected


def test_is_newer_without_version() -> None:
    assert is_newer(EARLIER, CREATE_RANK, NO_EVENT) is True


def test_current_event_is_live() -> None:
    assert OWN_LIVE.is_live is True
    assert OWN_DELETED.is_live is False
    assert OWN_CARRIED_OVER.is_live is False
    assert OWN_LIVE_WITHOUT_ID.is_live is False
    assert replace(OWN_LIVE, target=None).is_live is False
    assert NO_EVENT.is_live is False
