"""Pure sync decisions: what a booking snapshot calls for, and which calls close the gap.

Nothing here does I/O. The worker reads the mapping row and the newest snapshot, calls
`plan_change` for a plan, makes the calendar calls, and records the result. Because every
snapshot is a whole booking, the decision depends only on the newest snapshot and on what the
mapping says is in the calendar (level-triggered), never on the sequence of events in between.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum

from connector.calendars.base import EventBody, Target


class Presence(Enum):
    """Whether a booking should have a calendar event, and in which state."""

    NONE = "none"
    CONFIRMED = "confirmed"
    TENTATIVE = "tentative"


class MappingState(str, Enum):
    """The state of a booking's calendar event as the mapping table records it."""

    LIVE = "live"
    DELETED = "deleted"
    NONE = "none"
    CARRIED_OVER = "carried_over"


REMOVING_EVENTS = {"booking.cancelled", "booking.declined"}
MARKER_EVENTS = {"booking.noShow": "no_show", "booking.completed": "completed"}
REMOVING_STATUSES = {"cancelled", "canceled", "declined", "rejected"}
MARKER_STATUSES = {"noshow": "no_show", "no_show": "no_show", "no-show": "no_show", "completed": "completed"}


@dataclass(frozen=True)
class BookingDecision:
    """The event presence and marker the newest snapshot calls for, before any calendar is read."""

    presence: Presence
    marker: str | None = None
    warning: str | None = None


def decide_presence(event: str, status: object) -> BookingDecision:
    """Decide from the event type first, then from the status, matched case-insensitively."""
    if event in REMOVING_EVENTS:
        return BookingDecision(Presence.NONE)
    if event in MARKER_EVENTS:
        return BookingDecision(Presence.CONFIRMED, marker=MARKER_EVENTS[event])
    if event == "booking.approved":
        return BookingDecision(Presence.CONFIRMED)

    status_text = status.strip().lower() if isinstance(status, str) else ""
    if status_text == "confirmed":
        return BookingDecision(Presence.CONFIRMED)
    if status_text in {"pendingapproval", "pending_approval", "pending"}:
        return BookingDecision(Presence.TENTATIVE, marker="pending")
    if status_text in REMOVING_STATUSES:
        return BookingDecision(Presence.NONE)
    if status_text in MARKER_STATUSES:
        return BookingDecision(Presence.CONFIRMED, marker=MARKER_STATUSES[status_text])

    problem = "booking has no status" if status is None else f"unknown booking status {status!r}"
    return BookingDecision(Presence.CONFIRMED, warning=f"{problem}; the event is kept as confirmed")


def event_id_for(booking_id: str, generation: int) -> str:
    """Return the deterministic calendar event id of a booking's `generation`-th event.

    Google accepts ids of lowercase base32hex (a-v, 0-9), 5 to 1024 characters; hex digits and
    the letter g are all inside that alphabet. A retried insert reuses the id, so it can never
    create a second event; a deleted id can never be written again, so a re-created event takes
    the next generation.
    """
    digest = hashlib.sha256(f"proximity-booking:{booking_id}".encode("utf-8")).hexdigest()[:32]
    return f"{digest}g{generation}"


def digest_fields(body: EventBody) -> dict[str, str]:
    """Return a short digest of each top-level field, so changes can be found without storing the body."""
    return {name: _digest(value) for name, value in body.items()}


def digest_body(body: EventBody) -> str:
    """Return one digest of the whole event body."""
    return _digest(body)


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class CurrentEvent:
    """The calendar event of a booking, as the mapping table records it."""

    state: MappingState
    target: Target | None = None
    event_id: str | None = None
    generation: int = 0
    version: str | None = None
    rank: int = 0
    field_digests: dict[str, str] = field(default_factory=dict)
    carried_to: str | None = None

    @property
    def is_live(self) -> bool:
        return self.state is MappingState.LIVE and self.event_id is not None and self.target is not None


NO_EVENT = CurrentEvent(MappingState.NONE)


@dataclass(frozen=True)
class Desired:
    """The event the newest snapshot calls for, or `body=None` for no event."""

    target: Target | None
    body: EventBody | None


class Action(str, Enum):
    """The kind of change a plan makes."""

    STALE = "stale"
    CARRIED_OVER = "carried_over"
    UNCHANGED = "unchanged"
    CREATE = "create"
    UPDATE = "update"
    MOVE = "move"
    DELETE = "delete"


@dataclass(frozen=True)
class Plan:
    """The calendar calls that bring the calendar to the desired state.

    `base` is the event the plan starts from: the booking's own, or, on a takeover, the event of
    the booking it was rescheduled from. `changes` holds the fields an update sends, with None
    for a field to remove.
    """

    action: Action
    base: CurrentEvent
    changes: EventBody = field(default_factory=dict)
    takes_over_from: str | None = None

    @property
    def calls_calendar(self) -> bool:
        return self.action in {Action.CREATE, Action.UPDATE, Action.MOVE, Action.DELETE}


def is_newer(version: str, rank: int, current: CurrentEvent) -> bool:
    """Tell whether a snapshot (`version`, `rank`) is newer than the one last applied."""
    if current.version is None:
        return True
    return (version, rank) > (current.version, current.rank)


def plan_change(
    current: CurrentEvent,
    version: str,
    rank: int,
    desired: Desired,
    predecessor: tuple[str, CurrentEvent] | None = None,
) -> Plan:
    """Decide which calendar calls turn `current` into `desired`.

    `predecessor` is the booking named by `rescheduledFrom` and its mapping, if one is known; a
    booking that has no live event of its own takes over the predecessor's live event instead of
    creating a new one.
    """
    if current.state is MappingState.CARRIED_OVER:
        return Plan(Action.CARRIED_OVER, current)
    if not is_newer(version, rank, current):
        return Plan(Action.STALE, current)

    base = current
    takes_over_from = None
    if not current.is_live and predecessor is not None and predecessor[1].is_live:
        takes_over_from, base = predecessor

    if desired.body is None:
        action = Action.DELETE if base.is_live else Action.UNCHANGED
        return Plan(action, base, takes_over_from=takes_over_from)

    if not base.is_live:
        return Plan(Action.CREATE, base, changes=dict(desired.body), takes_over_from=takes_over_from)

    # A change of acting user alone is not a move: the event stays in the same calendar, and
    # the next calls are made as the new user.
    if base.target.calendar_id != desired.target.calendar_id:
        return Plan(Action.MOVE, base, changes=dict(desired.body), takes_over_from=takes_over_from)

    changes = changed_fields(base.field_digests, desired.body)
    action = Action.UPDATE if changes else Action.UNCHANGED
    return Plan(action, base, changes=changes, takes_over_from=takes_over_from)


def changed_fields(written: dict[str, str], body: EventBody) -> EventBody:
    """Return the fields of `body` that differ from what was written, and None for removed ones."""
    wanted = digest_fields(body)
    changes: EventBody = {name: body[name] for name, digest in wanted.items() if written.get(name) != digest}
    for name in written:
        if name not in body:
            changes[name] = None
    return changes
