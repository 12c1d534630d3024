"""Finding drift between the mapping table and the calendars, for `proximity-sync reconcile`.

The mapping table records which event each booking has. The calendars are read for the events that
carry a `proximityBookingId`, and the two are compared:

- missing: the booking's event is deleted in the calendar, or not there at all;
- changed: a field the connector writes differs from the newest applied snapshot;
- duplicate: another event carries the booking's id, or the booking should have no event;
- unknown: an event carries a booking id that the mapping table does not know.

Bookings with pending deliveries or a live lease are skipped, because the worker is about to
change them. Only the calendars that a mapping row or `--host` names are read, so an event in any
other calendar is not found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from connector.calendars.base import BOOKING_ID_PROPERTY, CalendarBackend, CalendarError, EventBody, RemoteEvent, Target
from connector.decisions import MappingState, Presence, decide_presence, digest_fields, event_id_for
from connector.envelope import EnvelopeError, parse_envelope, parse_timestamp
from connector.event_content import build_event_body
from connector.mappings import Mappings
from connector.snapshots import Snapshot, SnapshotError
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, read_only, utcnow

log = logging.getLogger(__name__)


class DriftKind(str, Enum):
    """A kind of difference between a calendar and the mapping table."""

    MISSING = "missing"
    CHANGED = "changed"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


@dataclass
class Drift:
    """One difference, and after `--fix` what was done about it.

    `deletable` marks a duplicate or unknown event whose id the connector derived from a booking
    id, which proves that the connector wrote it. `--fix` deletes only such events.
    """

    kind: DriftKind
    booking_id: str
    calendar_id: str
    event_id: str
    detail: str
    acting_user: str | None = None
    fields: list[str] = field(default_factory=list)
    deletable: bool = False
    fixed: bool = False
    result: str | None = None


@dataclass
class CalendarScan:
    """The booking events read from one calendar, or the error that stopped the read."""

    target: Target
    events: list[RemoteEvent] = field(default_factory=list)
    error: str | None = None


class DriftFinder:
    """Compares the mapping table with the calendars, within an optional host and start date."""

    def __init__(
        self,
        engine: Engine,
        backend: CalendarBackend,
        mappings: Mappings,
        *,
        host: str | None = None,
        since: datetime | None = None,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.mappings = mappings
        self.host = host.lower() if host else None
        self.since = since
        self.errors: list[str] = []
        self.busy: set[str] = set()
        self._busy_now = self._busy_bookings()
        self._deliveries: dict[str, Delivery | None] = {}
        self._events: dict[str, list[tuple[Target, RemoteEvent]]] = {}
        self._failed_calendars: set[str] = set()
        self._compared: set[str] = set()

    # ----- what to read -----

    def bookings(self) -> list[BookingMapping]:
        """Return the mapping rows in scope: every row with a calendar, narrowed by host and start."""
        query = select(BookingMapping).where(BookingMapping.calendar_id.is_not(None)).order_by(BookingMapping.booking_id)
        if self.host:
            query = query.where(
                or_(func.lower(BookingMapping.acting_user) == self.host, func.lower(BookingMapping.calendar_id) == self.host)
            )
        with Session(read_only(self.engine), expire_on_commit=False) as session:
            rows = list(session.execute(query).scalars())
            session.expunge_all()
        return [row for row in rows if self._starts_in_scope(row)]

    def calendars(self, rows: Iterable[BookingMapping]) -> list[Target]:
        """Return each calendar to read once, with an acting user that can read it."""
        users: dict[str, str | None] = {}
        for row in rows:
            if users.get(row.calendar_id) is None:
                users[row.calendar_id] = row.acting_user
        if self.host and self.host not in users:
            users[self.host] = self.host
        return [Target(calendar_id, user) for calendar_id, user in users.items()]

    def scan(self, target: Target) -> CalendarScan:
        """Read a calendar's live booking events, keeping those that start in scope."""
        try:
            events = self.backend.list_booking_events(target)
        except CalendarError as error:
            self._failed_calendars.add(target.calendar_id)
            return CalendarScan(target, error=error.describe())

        events = [event for event in events if self._event_in_scope(event)]
        for event in events:
            self._events.setdefault(event.booking_id, []).append((target, event))
        return CalendarScan(target, events)

    # ----- comparing -----

    def compare(self, row: BookingMapping) -> list[Drift]:
        """Compare one booking's mapping row with what the calendars hold."""
        if row.booking_id in self._busy_now:
            self.busy.add(row.booking_id)
            self._compared.add(row.booking_id)
            return []
        if row.state != MappingState.LIVE.value or not row.event_id:
            return []

        self._compared.add(row.booking_id)
        if row.calendar_id in self._failed_calendars:
            return []

        target = Target(row.calendar_id, row.acting_user)
        own, others = self._split_events(row)
        drift: list[Drift] = []

        if own is None:
            try:
                own = self.backend.get_event(target, row.event_id)
            except CalendarError as error:
                self.errors.append(f"booking {row.booking_id}: reading event {row.event_id} failed: {error.describe()}")
                return []
            if own is None or not own.is_live:
                detail = "deleted in the calendar" if own is not None else "not in the calendar"
                drift.append(Drift(DriftKind.MISSING, row.booking_id, row.calendar_id, row.event_id, detail, row.acting_user))
                own = None

        if own is not None:
            fields = self.changed_fields(row, own.body)
            if fields:
                detail = f"changed in the calendar: {', '.join(fields)}"
                drift.append(Drift(DriftKind.CHANGED, row.booking_id, row.calendar_id, row.event_id, detail, row.acting_user, fields))

        for other_target, event in others:
            detail = f"a second event of the booking, which has {row.event_id} in {row.calendar_id}"
            drift.append(self._extra(DriftKind.DUPLICATE, other_target, event, detail))
        return drift

    def leftovers(self) -> list[Drift]:
        """Return the events found in the calendars whose booking `compare` did not cover."""
        booking_ids = [booking_id for booking_id in self._events if booking_id not in self._compared]
        rows = self._mapping_rows(booking_ids)
        drift: list[Drift] = []

        for booking_id in booking_ids:
            if booking_id in self._busy_now:
                self.busy.add(booking_id)
                continue
            row = rows.get(booking_id)
            for target, event in self._events[booking_id]:
                if row is None:
                    detail = "carries a booking id that the mapping table does not know"
                    drift.append(self._extra(DriftKind.UNKNOWN, target, event, detail))
                elif row.state != MappingState.LIVE.value:
                    detail = f"the booking should have no event (its mapping is {row.state})"
                    drift.append(self._extra(DriftKind.DUPLICATE, target, event, detail))
                elif (target.calendar_id, event.event_id) != (row.calendar_id, row.event_id):
                    detail = f"a second event of the booking, which has {row.event_id} in {row.calendar_id}"
                    drift.append(self._extra(DriftKind.DUPLICATE, target, event, detail))
        return drift

    def changed_fields(self, row: BookingMapping, body: EventBody) -> list[str]:
        """Return the fields the connector writes whose value in the calendar differs.

        A field is unchanged when its digest equals the one stored when it was written. It is also
        unchanged when it means the same as the newest applied snapshot renders it, because the
        calendar may write a time with another offset or leave out the default transparency.
        """
        written = json.loads(row.field_digests or "{}")
        desired = self.desired_body(row)
        names = sorted(set(written) | set(desired or {}))

        changed = []
        for name in names:
            actual = body.get(name)
            if name in written and digest_fields({name: actual})[name] == written[name]:
                continue
            if desired is not None and comparable(name, actual) == comparable(name, desired.get(name)):
                continue
            changed.append(name)
        return changed

    def desired_body(self, row: BookingMapping) -> EventBody | None:
        """Render the event of the booking's newest applied snapshot as the worker does, or None.

        None means the payload is no longer stored or cannot be rendered with today's mappings.
        """
        snapshot = self.applied_snapshot(row)
        if snapshot is None:
            return None

        decision = decide_presence(snapshot.event, snapshot.status)
        if decision.presence is Presence.NONE:
            return None
        try:
            text = self.mappings.template.render(snapshot.payload, decision.marker)
            return build_event_body(snapshot, decision, text)
        except (SnapshotError, ValueError) as error:
            log.warning("booking %s: the applied snapshot cannot be rendered: %s", row.booking_id, error)
            return None

    def applied_snapshot(self, row: BookingMapping) -> Snapshot | None:
        """Return the snapshot of the booking's newest applied delivery, if its payload is stored."""
        delivery = self.applied_delivery(row)
        if delivery is None or delivery.body is None:
            return None
        try:
            envelope = parse_envelope(delivery.body)
        except EnvelopeError:
            return None
        return Snapshot(
            booking_id=delivery.booking_id or row.booking_id,
            event=delivery.event,
            version=delivery.version,
            rank=delivery.rank,
            payload=envelope.payload,
            delivery_id=delivery.delivery_id,
        )

    def applied_delivery(self, row: BookingMapping) -> Delivery | None:
        """Return the delivery whose snapshot the mapping row records, if it is still stored."""
        if row.booking_id not in self._deliveries:
            delivery = None
            if row.last_delivery_id:
                with Session(read_only(self.engine), expire_on_commit=False) as session:
                    delivery = session.execute(
                        select(Delivery).where(Delivery.delivery_id == row.last_delivery_id)
                    ).scalar_one_or_none()
                    session.expunge_all()
            self._deliveries[row.booking_id] = delivery
        return self._deliveries[row.booking_id]

    def mapping(self, booking_id: str) -> BookingMapping | None:
        """Return a booking's mapping row as it is now."""
        with Session(read_only(self.engine), expire_on_commit=False) as session:
            row = session.get(BookingMapping, booking_id)
            session.expunge_all()
        return row

    # ----- helpers -----

    def _split_events(self, row: BookingMapping) -> tuple[RemoteEvent | None, list[tuple[Target, RemoteEvent]]]:
        own = None
        others = []
        for target, event in self._events.get(row.booking_id, []):
            if target.calendar_id == row.calendar_id and event.event_id == row.event_id:
                own = event
            else:
                others.append((target, event))
        return own, others

    def _extra(self, kind: DriftKind, target: Target, event: RemoteEvent, detail: str) -> Drift:
        booking_id = event.booking_id or ""
        return Drift(
            kind,
            booking_id,
            target.calendar_id,
            event.event_id,
            detail,
            target.acting_user,
            deletable=self._written_by_connector(event.event_id, booking_id),
        )

    def _written_by_connector(self, event_id: str, booking_id: str) -> bool:
        """Tell whether the id is one the connector derives from this booking or one it took over from."""
        candidates = [booking_id, *self._predecessors(booking_id)]
        for candidate in candidates:
            prefix = event_id_for(candidate, 0).removesuffix("0")
            if event_id.startswith(prefix) and event_id[len(prefix):].isdigit():
                return True
        return False

    def _predecessors(self, booking_id: str) -> list[str]:
        query = select(BookingMapping.booking_id).where(BookingMapping.carried_to == booking_id)
        with read_only(self.engine).connect() as connection:
            return list(connection.execute(query).scalars())

    def _mapping_rows(self, booking_ids: list[str]) -> dict[str, BookingMapping]:
        if not booking_ids:
            return {}
        with Session(read_only(self.engine), expire_on_commit=False) as session:
            rows = list(session.execute(select(BookingMapping).where(BookingMapping.booking_id.in_(booking_ids))).scalars())
            session.expunge_all()
        return {row.booking_id: row for row in rows}

    def _busy_bookings(self) -> set[str]:
        """Return the bookings with pending deliveries or a live lease: the worker owns them now."""
        pending = select(Delivery.booking_id).where(Delivery.state == DeliveryState.PENDING, Delivery.booking_id.is_not(None))
        leased = select(BookingLease.booking_id).where(BookingLease.expires_at > utcnow())
        with read_only(self.engine).connect() as connection:
            return set(connection.execute(pending.distinct()).scalars()) | set(connection.execute(leased).scalars())

    def _starts_in_scope(self, row: BookingMapping) -> bool:
        if self.since is None:
            return True
        snapshot = self.applied_snapshot(row)
        start = snapshot.payload.get("startTime") if snapshot is not None else None
        moment = parse_timestamp(start) if isinstance(start, str) else None
        return moment is None or moment >= self.since

    def _event_in_scope(self, event: RemoteEvent) -> bool:
        if self.since is None:
            return True
        moment = event_start(event.body)
        return moment is None or moment >= self.since


def event_start(body: EventBody) -> datetime | None:
    """Return an event's start as a UTC time, from `dateTime` or from an all-day `date`."""
    start = body.get("start")
    if not isinstance(start, dict):
        return None
    value = start.get("dateTime") or start.get("date")
    return parse_timestamp(value) if isinstance(value, str) else None


def comparable(name: str, value: Any) -> Any:
    """Return a field's value in a form that compares by meaning rather than by notation."""
    if name == "transparency":
        return value or "opaque"
    if name in ("start", "end") and isinstance(value, dict):
        if value.get("dateTime"):
            moment = parse_timestamp(str(value["dateTime"]))
            return ("dateTime", moment.isoformat() if moment else value["dateTime"])
        return ("date", value.get("date"))
    if name == "extendedProperties":
        private = (value or {}).get("private") or {}
        return private.get(BOOKING_ID_PROPERTY)
    if value == "":
        return None
    return value
