"""Syncing one booking: from its newest pending snapshot to calendar calls and a mapping row.

The worker calls `BookingSync.sync(booking_id)` while it holds the booking's lease. Each run reads
the booking's pending deliveries, applies only the newest snapshot (older ones are stale by
definition, since every snapshot is the whole booking), and records the calendar event and the
outcome of every delivery in one transaction.

Crash safety comes from deterministic event ids: a run that dies after the calendar committed
but before the mapping did is repeated by the next run, whose insert answers "already exists"
and adopts the event instead of creating a second one.

What a failed run does with the newest delivery (the older ones are recorded as superseded):

- transient calendar error: retried later with `DeliveryBackoff`, and failed after the last attempt;
- rate limit or quota: retried later without using up an attempt, at the calendar's Retry-After;
- permanent error (calendar, route, snapshot): failed at once, with the error in words;
- booking busy, calendar paused by the breaker, worker stopping: retried later, attempts untouched.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from connector.calendars.base import (
    CalendarBackend,
    CalendarError,
    EventAlreadyExistsError,
    EventBody,
    EventGoneError,
    PermanentCalendarError,
    RateLimitedError,
    Target,
    TransientCalendarError,
)
from connector.decisions import (
    Action,
    BookingDecision,
    CurrentEvent,
    Desired,
    MappingState,
    Plan,
    Presence,
    decide_presence,
    digest_body,
    digest_fields,
    event_id_for,
    plan_change,
)
from connector.envelope import EnvelopeError, parse_envelope
from connector.logs import bind_delivery, outcome_fields
from connector.metrics import DELIVERIES_FINISHED
from connector.event_content import RenderedText, build_event_body
from connector.mapping_rows import (
    MappingUpdate,
    carried_over,
    load_current,
    record_insert_intent,
    restore_mappings,
    write_mapping,
)
from connector.queue import (
    DELIVERIES,
    PendingDelivery,
    acquire_lease,
    format_attempts,
    finish_deliveries,
    hand_back_lease,
    load_booking,
    release_lease,
    release_lease_if_idle,
    renew_lease,
    schedule_retry,
    supersede_failed,
    unsettled_since,
)
from connector.routing import NoRouteError
from connector.snapshots import Snapshot, SnapshotError
from connector.storage import DeliveryState, utcnow
from connector.worker import MAX_DISPATCH_WAIT_SECONDS, ShutdownRequested

log = logging.getLogger(__name__)

# Inserting a new generation after finding the id taken by a deleted event is bounded, so a
# calendar that keeps answering "already exists" fails the delivery instead of looping.
MAX_GENERATION_BUMPS = 5

# Seconds before a booking whose predecessor was leased by another worker is tried again, unless
# the delivery backoff's first wait is shorter.
BUSY_RETRY_SECONDS = 1.0


class Router(Protocol):
    def route(self, payload: dict) -> Target: ...


class Template(Protocol):
    def render(self, payload: dict, marker: str | None) -> RenderedText: ...


class PermanentSyncError(Exception):
    """The newest snapshot cannot be applied until someone changes the setup or the booking."""


class BookingBusyError(Exception):
    """A booking this sync needs is leased by another worker, or still retrying a change; try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CalendarPausedError(Exception):
    """A calendar this sync needs failed moments ago, so it is not called until `seconds` from now."""

    def __init__(self, calendar_id: str, seconds: float, cause: str) -> None:
        super().__init__(f"calendar {calendar_id} is paused for {seconds:.1f} s after a failure ({cause}); not called")
        self.seconds = seconds


@dataclass(frozen=True)
class DeliveryBackoff:
    """When a delivery that failed with a transient error is tried again."""

    base_seconds: float = 30.0
    max_seconds: float = 900.0
    max_attempts: int = 14

    def delay(self, attempts_made: int, retry_after: float | None = None) -> float | None:
        """Return the wait before the next attempt, or None when no attempt is left.

        The wait doubles from `base_seconds` up to `max_seconds`, with full jitter in its upper
        half, and is never shorter than the calendar's Retry-After.
        """
        if attempts_made >= self.max_attempts:
            return None
        return self.wait(attempts_made, retry_after)

    def wait(self, attempts_made: int, retry_after: float | None = None) -> float:
        """Return the wait after `attempts_made` attempts, whether or not an attempt is left."""
        ceiling = self._ceiling(attempts_made)
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    def shortest_span(self) -> float:
        """Return the least time from a delivery's first attempt to its last, with every jitter at its lowest.

        A delivery whose calendar recovers within this time is applied rather than failed.
        """
        return sum(self._ceiling(attempts) / 2 for attempts in range(1, self.max_attempts))

    def _ceiling(self, attempts_made: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2 ** max(attempts_made - 1, 0))


class CalendarBreaker:
    """Pauses the calls to a calendar for a while after a call to it failed transiently.

    While one calendar is down, the other bookings routed to it are put back at once instead of
    each spending its in-call retries. The worker's threads stay free for other calendars, and the
    failing calendar gets one probe per pause instead of a call per booking. The pauses live in
    memory, so losing them on a restart costs a few calls, never a delivery.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._paused: dict[str, tuple[float, str]] = {}

    def trip(self, calendar_id: str, seconds: float, cause: str) -> None:
        """Pause the calendar's calls for `seconds` from now, or longer if it is paused already."""
        until = self._clock() + seconds
        with self._lock:
            current = self._paused.get(calendar_id)
            if current is None or current[0] < until:
                self._paused[calendar_id] = (until, cause)

    def check(self, calendar_id: str) -> None:
        """Raise CalendarPausedError if the calendar is paused."""
        now = self._clock()
        with self._lock:
            paused = self._paused.get(calendar_id)
            if paused is not None and paused[0] <= now:
                del self._paused[calendar_id]
                paused = None
        if paused is not None:
            raise CalendarPausedError(calendar_id, paused[0] - now, paused[1])


@dataclass(frozen=True)
class SyncRun:
    """The result of one `BookingSync.sync` call: deliveries finished or rescheduled, and whether the lease was given back."""

    handled: int
    lease_released: bool = False


@dataclass(frozen=True)
class Applied:
    """What a plan did: the mapping rows to write and a sentence for the log."""

    mapping: MappingUpdate | None
    predecessor: MappingUpdate | None
    outcome: str


class BookingSync:
    """Applies a booking's newest pending snapshot to its calendar."""

    def __init__(
        self,
        engine: Engine,
        backend: CalendarBackend,
        router: Router,
        template: Template,
        owner: str,
        lease_seconds: float = 120.0,
        backoff: DeliveryBackoff | None = None,
        breaker: CalendarBreaker | None = None,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.router = router
        self.template = template
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.backoff = backoff or DeliveryBackoff()
        self.breaker = breaker or CalendarBreaker()
        self._lock = threading.Lock()
        self._predecessor_leases: set[str] = set()

    def held_leases(self) -> set[str]:
        """Return the predecessor bookings leased by syncs running now, whose leases need renewing too."""
        with self._lock:
            return set(self._predecessor_leases)

    def sync(self, booking_id: str, *, release_when_done: bool = False) -> SyncRun:
        """Apply the booking's pending deliveries, while the caller holds the booking's lease.

        With `release_when_done`, the transaction that records an applied snapshot also gives the
        lease back if no other delivery of the booking is due, which saves the caller a transaction.
        It gives the lease back even then if the booking's calendar cannot be called again within
        MAX_DISPATCH_WAIT_SECONDS. The thread then serves other bookings while the pacer spaces out
        this booking's calls, and the worker's dispatcher hands the booking out again later.
        """
        pending, current = load_booking(self.engine, booking_id)
        now = utcnow()
        if not any(delivery.next_attempt_at <= now for delivery in pending):
            return SyncRun(0)

        started = time.perf_counter()
        deliveries, snapshots = self._snapshots(pending)
        if not deliveries:
            return SyncRun(len(pending))
        newest_index = max(range(len(snapshots)), key=lambda index: (snapshots[index].version, snapshots[index].rank))
        newest = snapshots[newest_index]
        predecessor_id = newest.rescheduled_from
        predecessor_leased = False
        bind_delivery(booking_id, newest.delivery_id)

        try:
            if predecessor_id is not None:
                predecessor_leased = self._lease_predecessor(predecessor_id)
            applied = self._apply(newest, current, predecessor_id)
        except ShutdownRequested:
            log.info("booking %s delivery %s: left pending because the worker is stopping", booking_id, newest.delivery_id)
            return SyncRun(0)
        except BookingBusyError as error:
            delay = error.retry_after if error.retry_after is not None else self._busy_wait()
            self._retry(deliveries, newest_index, newest, str(error), delay, counted=False)
            return SyncRun(len(deliveries))
        except CalendarPausedError as error:
            delay = error.seconds + random.uniform(0, self.backoff.base_seconds)
            self._retry(deliveries, newest_index, newest, self._describe(newest, error), delay, counted=False)
            return SyncRun(len(deliveries))
        except RateLimitedError as error:
            # Rate limits and quotas mean "slower", not "broken": the pacer already holds back
            # the host's calls, and the delivery waits without using up an attempt.
            delay = self.backoff.wait(max(deliveries[newest_index].attempts, 1), error.retry_after)
            self._retry(deliveries, newest_index, newest, self._describe(newest, error), delay, counted=False)
            return SyncRun(len(deliveries))
        except TransientCalendarError as error:
            if error.calendar_id:
                pause = max(error.retry_after or 0.0, self.backoff.base_seconds)
                self.breaker.trip(error.calendar_id, pause, error.describe())
            self._retry_counted(deliveries, newest_index, newest, self._describe(newest, error), error.retry_after)
            return SyncRun(len(deliveries))
        except (CalendarError, PermanentSyncError, SnapshotError, NoRouteError) as error:
            self._fail(deliveries, newest_index, newest, self._describe(newest, error))
            return SyncRun(len(deliveries))
        except SQLAlchemyError:
            raise
        except Exception as error:
            # A bug must not turn into a tight loop: the deliveries back off like a transient error.
            log.exception("booking %s delivery %s: unexpected error", booking_id, newest.delivery_id)
            self._retry_counted(deliveries, newest_index, newest, self._describe(newest, error), None)
            return SyncRun(len(deliveries))
        finally:
            if predecessor_leased:
                with self._lock:
                    self._predecessor_leases.discard(predecessor_id)
                release_lease(self.engine, predecessor_id, self.owner)

        released = self._record(deliveries, newest_index, newest, applied, release_when_done)
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info(
            "booking %s delivery %s: %s (%.0f ms)", booking_id, newest.delivery_id, applied.outcome, elapsed_ms,
            extra=outcome_fields(applied.outcome, applied.mapping, elapsed_ms),
        )
        return SyncRun(len(deliveries), lease_released=released)

    def _snapshots(self, deliveries: list[PendingDelivery]) -> tuple[list[PendingDelivery], list[Snapshot]]:
        """Parse each delivery's body; fail the ones that no longer parse, and return the rest."""
        parsed: list[tuple[PendingDelivery, Snapshot]] = []
        broken: dict[int, tuple[str, str]] = {}
        for delivery in deliveries:
            try:
                parsed.append((delivery, self._snapshot(delivery)))
            except EnvelopeError as error:
                # The receiver checked the body, so only a body stored by an older version or
                # changed in the database gets here; retrying it cannot help.
                message = f"booking {delivery.booking_id}: the stored body is not a valid envelope ({error})"
                broken[delivery.id] = (DeliveryState.FAILED, message)
                log.error("booking %s delivery %s failed: %s", delivery.booking_id, delivery.delivery_id, message)

        if broken:
            with self.engine.begin() as connection:
                finish_deliveries(connection, broken)
            DELIVERIES_FINISHED.labels(DeliveryState.FAILED).inc(len(broken))
        return [delivery for delivery, _ in parsed], [snapshot for _, snapshot in parsed]

    def _snapshot(self, delivery: PendingDelivery) -> Snapshot:
        envelope = parse_envelope(delivery.body or b"")
        return Snapshot(
            booking_id=delivery.booking_id or "",
            event=delivery.event,
            version=delivery.version,
            rank=delivery.rank,
            payload=envelope.payload,
            delivery_id=delivery.delivery_id,
        )

    def _lease_predecessor(self, predecessor_id: str) -> bool:
        if not acquire_lease(self.engine, predecessor_id, self.owner, self.lease_seconds):
            raise BookingBusyError(f"booking {predecessor_id} (rescheduled into this one) is being synced by another worker")
        with self._lock:
            self._predecessor_leases.add(predecessor_id)

        # A predecessor whose last sync failed may have an event that its mapping does not name
        # yet, such as an insert whose response was lost. Taking over its old event now would
        # leave that one behind, so the predecessor's own retry goes first.
        retry_at = unsettled_since(self.engine, predecessor_id)
        if retry_at is not None:
            with self._lock:
                self._predecessor_leases.discard(predecessor_id)
            release_lease(self.engine, predecessor_id, self.owner)
            wait = max((retry_at - utcnow()).total_seconds(), 0.0) + self._busy_wait()
            raise BookingBusyError(
                f"booking {predecessor_id} (rescheduled into this one) has a change waiting for a retry, "
                "which is applied first",
                retry_after=wait,
            )
        return True

    def _busy_wait(self) -> float:
        return min(BUSY_RETRY_SECONDS, self.backoff.base_seconds)

    def _apply(self, snapshot: Snapshot, current: CurrentEvent, predecessor_id: str | None) -> Applied:
        predecessor = None
        if predecessor_id is not None:
            predecessor = (predecessor_id, load_current(self.engine, predecessor_id))

        decision = decide_presence(snapshot.event, snapshot.status)
        desired = self._desired(snapshot, decision) if _needs_event(decision, current, snapshot) else Desired(None, None)
        plan = plan_change(current, snapshot.version, snapshot.rank, desired, predecessor)

        # A stale snapshot changes nothing, so its status does not matter either.
        if decision.warning and plan.action is not Action.STALE:
            log.warning("booking %s delivery %s: %s", snapshot.booking_id, snapshot.delivery_id, decision.warning)
        return self._execute(plan, snapshot, desired, predecessor_id)

    def _desired(self, snapshot: Snapshot, decision: BookingDecision) -> Desired:
        if decision.presence is Presence.NONE:
            return Desired(None, None)
        target = self.router.route(snapshot.payload)
        text = self.template.render(snapshot.payload, decision.marker)
        return Desired(target, build_event_body(snapshot, decision, text))

    def _execute(self, plan: Plan, snapshot: Snapshot, desired: Desired, predecessor_id: str | None) -> Applied:
        base = plan.base
        action = plan.action

        if action is Action.CARRIED_OVER:
            return self._unchanged(f"ignored: booking was rescheduled into {base.carried_to}")
        if action is Action.STALE:
            return self._unchanged("stale: not newer than the applied snapshot")
        for calendar_id in _called_calendars(plan, desired):
            self.breaker.check(calendar_id)

        if action is Action.UNCHANGED:
            state = base.state if base.is_live else MappingState.NONE
            outcome = "unchanged" if base.is_live else "no event needed"
            target = desired.target or base.target
            result = self._mapping(snapshot, base, state, target, base.event_id, base.generation, desired.body)
        elif action is Action.DELETE:
            self.backend.delete_event(base.target, base.event_id)
            outcome = f"deleted event {base.event_id} from {base.target.calendar_id}"
            result = self._mapping(snapshot, base, MappingState.DELETED, base.target, base.event_id, base.generation, None)
        elif action is Action.UPDATE:
            result, outcome = self._update(snapshot, base, plan.changes, desired)
        elif action is Action.MOVE:
            result, outcome = self._move(snapshot, base, desired)
        else:
            generation = base.generation + 1 if base.event_id else base.generation
            event_id, generation = self._insert(desired.target, snapshot, generation, desired.body, intent=True)
            outcome = f"created event {event_id} in {desired.target.calendar_id}"
            result = self._mapping(snapshot, base, MappingState.LIVE, desired.target, event_id, generation, desired.body)

        return self._with_predecessor(result, outcome, snapshot, plan, predecessor_id)

    def _update(self, snapshot: Snapshot, base: CurrentEvent, changes: EventBody, desired: Desired):
        try:
            self.backend.patch_event(desired.target, base.event_id, changes)
        except EventGoneError as error:
            # The host deleted the event by hand, and a deleted id can never be written again, so
            # the booking gets the next generation. A 404 means the id was never used: an insert
            # whose outcome was unknown did not happen, so the same id is inserted now.
            generation = base.generation if error.status == 404 else base.generation + 1
            event_id, generation = self._insert(desired.target, snapshot, generation, desired.body, intent=True)
            outcome = f"re-created event {event_id} in {desired.target.calendar_id} (the previous one was not in the calendar)"
            return self._mapping(snapshot, base, MappingState.LIVE, desired.target, event_id, generation, desired.body), outcome

        fields = ", ".join(sorted(changes))
        outcome = f"updated {fields} of event {base.event_id} in {desired.target.calendar_id}"
        return self._mapping(snapshot, base, MappingState.LIVE, desired.target, base.event_id, base.generation, desired.body), outcome

    def _move(self, snapshot: Snapshot, base: CurrentEvent, desired: Desired):
        # The old event is deleted before the new one is written, so that the mapping can name
        # the new one before its insert is sent. Whatever happens to that insert, no later change
        # of the booking leaves an event behind. The cost: while the insert keeps failing, the
        # booking is in neither calendar.
        self.backend.delete_event(base.target, base.event_id)
        event_id, generation = self._insert(desired.target, snapshot, base.generation + 1, desired.body, intent=True)
        outcome = f"moved event from {base.target.calendar_id} to {desired.target.calendar_id} as {event_id}"
        return self._mapping(snapshot, base, MappingState.LIVE, desired.target, event_id, generation, desired.body), outcome

    def _insert(
        self, target: Target, snapshot: Snapshot, generation: int, body: EventBody, *, intent: bool = False
    ) -> tuple[str, int]:
        """Insert the booking's event under the first free generation; adopt a live one already there.

        With `intent`, each id is recorded in the booking's mapping before it is sent (see
        `record_insert_intent`). The record replaces the booking's mapping and marks the booking it
        was rescheduled from as carried over, so callers ask for it only when neither has a live
        event any more.
        """
        booking_id = snapshot.booking_id
        saved = None
        for _ in range(MAX_GENERATION_BUMPS):
            event_id = event_id_for(booking_id, generation)
            if intent:
                recorded = record_insert_intent(
                    self.engine, booking_id, target, event_id, generation, snapshot.rescheduled_from
                )
                saved = saved or recorded
            try:
                self.backend.insert_event(target, event_id, body)
                return event_id, generation
            except EventAlreadyExistsError:
                existing = self.backend.get_event(target, event_id)
            except PermanentCalendarError:
                # The calendar refused the insert and stored nothing, so the mapping rows go back to
                # what they were. A transient error keeps the record, because the outcome is unknown.
                if saved is not None:
                    restore_mappings(self.engine, saved)
                raise

            if existing is not None and existing.is_live:
                log.info("booking %s: adopted existing event %s in %s", booking_id, event_id, target.calendar_id)
                self.backend.patch_event(target, event_id, body)
                return event_id, generation
            generation += 1

        raise PermanentSyncError(
            f"event ids of generations up to {generation} are all taken by deleted events in {target.calendar_id}"
        )

    def _mapping(self, snapshot, base, state, target, event_id, generation, body) -> MappingUpdate:
        return MappingUpdate(
            booking_id=snapshot.booking_id,
            state=state,
            target=target,
            event_id=event_id,
            generation=generation,
            version=snapshot.version,
            rank=snapshot.rank,
            field_digests=digest_fields(body) if body else {},
            event_digest=digest_body(body) if body else None,
            last_delivery_id=snapshot.delivery_id,
        )

    @staticmethod
    def _unchanged(outcome: str) -> Applied:
        """Return a result that writes no mapping, so every delivery is recorded as stale."""
        return Applied(mapping=None, predecessor=None, outcome=outcome)

    def _with_predecessor(self, result, outcome, snapshot, plan, predecessor_id) -> Applied:
        if predecessor_id is None:
            return Applied(result, None, outcome)

        if plan.takes_over_from is not None:
            outcome += f" (taken over from booking {predecessor_id})"
        elif plan.base.is_live:
            # The booking already has its own event, so the predecessor's mapping stays as it is.
            return Applied(result, None, outcome)

        # From now on the predecessor's own snapshots change nothing: a late create of it must not
        # add a second event, and its cancellation must not remove the carried-over one.
        return Applied(result, carried_over(predecessor_id, snapshot.booking_id), outcome)

    def _record(
        self, deliveries: list[PendingDelivery], newest_index: int, newest: Snapshot, applied: Applied, release_when_done: bool
    ) -> bool:
        """Write the outcome in one transaction; return whether the booking's lease was given back too."""
        state = DeliveryState.STALE if applied.mapping is None else DeliveryState.APPLIED
        outcomes = self._superseded(deliveries, newest_index, newest)
        outcomes[deliveries[newest_index].id] = (state, applied.outcome)

        # The lease is checked last, in the same transaction: if another worker took the booking
        # over, LeaseLostError rolls back everything this transaction wrote.
        with self.engine.begin() as connection:
            if applied.mapping is not None:
                write_mapping(connection, applied.mapping)
                supersede_failed(connection, newest.booking_id, newest.version, newest.rank, newest.delivery_id)
            if applied.predecessor is not None:
                write_mapping(connection, applied.predecessor)
            finish_deliveries(connection, outcomes)
            released = False
            if release_when_done:
                give_back = hand_back_lease if self._paced(applied.mapping) else release_lease_if_idle
                released = give_back(connection, newest.booking_id, self.owner)
            if not released:
                renew_lease(connection, newest.booking_id, self.owner, self.lease_seconds)

        for state, _ in outcomes.values():
            DELIVERIES_FINISHED.labels(state).inc()
        return released

    def _paced(self, mapping: MappingUpdate | None) -> bool:
        """Return whether the next call for the booking's calendar would wait longer for the pacer than a dispatch may."""
        if mapping is None or mapping.target is None:
            return False
        return self.backend.pacing_wait(mapping.target) > MAX_DISPATCH_WAIT_SECONDS

    def _retry_counted(
        self, deliveries: list[PendingDelivery], newest_index: int, newest: Snapshot, error: str, retry_after: float | None
    ) -> None:
        """Put the newest delivery back with its backoff, or fail it when its last attempt is used up."""
        attempts = deliveries[newest_index].attempts + 1
        delay = self.backoff.delay(attempts, retry_after)
        if delay is None:
            self._fail(deliveries, newest_index, newest, f"{error} (gave up after {format_attempts(attempts)})")
            return
        self._retry(deliveries, newest_index, newest, error, delay, counted=True)

    def _retry(
        self, deliveries: list[PendingDelivery], newest_index: int, newest: Snapshot, error: str, delay: float, *, counted: bool
    ) -> None:
        """Put the newest delivery back to be tried `delay` seconds from now; the older ones are superseded."""
        newest_row = deliveries[newest_index]
        with self.engine.begin() as connection:
            finish_deliveries(connection, self._superseded(deliveries, newest_index, newest))
            schedule_retry(connection, newest_row.id, error, delay, counted=counted)

        DELIVERIES_FINISHED.labels("retried").inc()
        DELIVERIES_FINISHED.labels(DeliveryState.STALE).inc(len(deliveries) - 1)
        attempt = f"attempt {newest_row.attempts + 1} failed" if counted else "not counted as an attempt"
        log.warning(
            "booking %s delivery %s: retrying in %.1f s (%s): %s",
            newest.booking_id, newest.delivery_id, delay, attempt, error,
        )

    def _fail(self, deliveries: list[PendingDelivery], newest_index: int, newest: Snapshot, error: str) -> None:
        """Mark the newest delivery failed with the error in words; the older ones are superseded."""
        outcomes = self._superseded(deliveries, newest_index, newest)
        outcomes[deliveries[newest_index].id] = (DeliveryState.FAILED, error)
        with self.engine.begin() as connection:
            finish_deliveries(connection, outcomes)
            connection.execute(
                DELIVERIES.update().where(DELIVERIES.c.id == deliveries[newest_index].id)
                .values(attempts=DELIVERIES.c.attempts + 1)
            )
        for state, _ in outcomes.values():
            DELIVERIES_FINISHED.labels(state).inc()
        log.error("booking %s delivery %s failed: %s", newest.booking_id, newest.delivery_id, error)

    @staticmethod
    def _superseded(deliveries: list[PendingDelivery], newest_index: int, newest: Snapshot) -> dict[int, tuple[str, str]]:
        """Return the outcome of every delivery but the newest: stale, because a newer snapshot exists."""
        return {
            delivery.id: (DeliveryState.STALE, f"superseded by delivery {newest.delivery_id}")
            for index, delivery in enumerate(deliveries)
            if index != newest_index
        }

    @staticmethod
    def _describe(snapshot: Snapshot, error: Exception) -> str:
        text = error.describe() if isinstance(error, CalendarError) else str(error)
        return f"booking {snapshot.booking_id}: {text}"


def _called_calendars(plan: Plan, desired: Desired) -> set[str]:
    """Return the calendars a plan writes to."""
    if plan.action is Action.DELETE:
        return {plan.base.target.calendar_id}
    if plan.action is Action.MOVE:
        return {plan.base.target.calendar_id, desired.target.calendar_id}
    if plan.action in (Action.CREATE, Action.UPDATE):
        return {desired.target.calendar_id}
    return set()


def _needs_event(decision: BookingDecision, current: CurrentEvent, snapshot: Snapshot) -> bool:
    """Tell whether the desired event must be built (routing and rendering can fail)."""
    if decision.presence is Presence.NONE:
        return False
    if current.state is MappingState.CARRIED_OVER:
        return False
    return (snapshot.version, snapshot.rank) > (current.version or "", current.rank)
