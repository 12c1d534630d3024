"""The sync worker: hands due bookings to a pool of threads, one booking per thread at a time.

A dispatcher thread finds bookings with due deliveries, takes each one's lease, and submits it to
the pool. It wakes at once when the receiver in the same process commits a delivery, and polls
otherwise, which is how a worker in a separate process sees new deliveries. It also renews the
leases of the bookings in flight, so a lease can be short (a crashed worker's bookings are taken
over soon) without a slow calendar call losing its booking to another worker.

Stopping is graceful: no new booking is taken, waits before calendar calls are cut short, the
bookings in flight finish their current call, and every lease is given back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.engine import Engine

from connector.envelope import parse_envelope
from connector.routing import NoRouteError
from connector.queue import (
    DueBooking,
    DueCursor,
    acquire_lease,
    acquire_leases,
    find_due,
    find_due_bookings,
    newest_pending_body,
    release_lease,
    renew_leases,
)

if TYPE_CHECKING:
    from connector.calendars.base import Target
    from connector.sync import BookingSync

log = logging.getLogger(__name__)

# A due booking is handed to a thread only if the pacer would let its calendar call go within
# this many seconds, counting the calls of the same acting user already handed out. A booking
# of a user whose calls are spaced out right now waits in the queue, not in a thread, so one
# host with many changes cannot hold every thread while other hosts' changes wait.
MAX_DISPATCH_WAIT_SECONDS = 0.05

# Pacing waits longer than this are not waited out in the queue, because such a user was slowed
# down after a rate-limit or quota error. Its bookings are handed out, and each sync waits for the
# slot or, past the backend's longest pacing wait (30 s for Google), puts the delivery back with
# a retry time.
MAX_QUEUED_PACING_SECONDS = 5.0

# The number of longest due deliveries that one search for work reads while it passes over paced
# bookings. When they do not fill the free threads, the search reads as many again from where the
# previous search left off (`DueCursor`). So a host with a larger backlog delays other hosts'
# bookings by one search per this many of its rows at most, not until its backlog shrinks below it.
MAX_ROWS_PER_DISPATCH = 1024

# Bookings without a mapping whose routed calendar the dispatcher remembers for pacing; the oldest
# is forgotten first.
MAX_ROUTE_HINTS = 4096

# Bookings without a mapping that one search for work routes, each with a query for its body. The
# search passes over the others and the next one starts at once, so a burst of new bookings costs
# many short searches rather than one long one.
MAX_ROUTES_PER_DISPATCH = 64


class ShutdownRequested(Exception):
    """The worker is stopping, so a wait before a calendar call was cut short."""


class StopSignal:
    """The worker's stop flag, which also cuts short the waits of calendar calls.

    Its `sleep` replaces `time.sleep` in the retry policy and the pacer, so a stopping worker does
    not wait out a backoff first.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask everything that waits on this signal to stop."""
        self._event.set()

    def is_set(self) -> bool:
        """Return whether a stop was requested."""
        return self._event.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep like `time.sleep`, but raise ShutdownRequested once a stop is requested."""
        if self._event.wait(max(seconds, 0.0)):
            raise ShutdownRequested("the worker is stopping")


class Housekeeping(Protocol):
    """Periodic work that runs alongside the worker, such as pruning old payloads."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def new_owner_id() -> str:
    """Return a worker identity that is unique across processes and hosts."""
    return f"worker-{uuid.uuid4().hex[:12]}"


class SyncWorker:
    """Runs `BookingSync` for due bookings until stopped."""

    def __init__(
        self,
        engine: Engine,
        booking_sync: BookingSync,
        *,
        threads: int = 8,
        poll_seconds: float = 0.5,
        lease_seconds: float = 120.0,
        stop_signal: StopSignal | None = None,
        housekeeping: Housekeeping | None = None,
    ) -> None:
        self.engine = engine
        self.booking_sync = booking_sync
        self.owner = booking_sync.owner
        self.threads = threads
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.housekeeping = housekeeping
        self._stop = stop_signal or StopSignal()
        self._wake = threading.Event()
        # Bookings handed to threads, with the calendar their mapping or routing hint named when they were.
        self._in_flight: dict[str, Target | None] = {}
        self._lock = threading.Lock()
        # Read and changed by the dispatcher thread alone.
        self._due_cursor = DueCursor()
        self._route_hints: OrderedDict[str, Target | None] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sync")
        self._dispatcher = threading.Thread(target=self._dispatch_forever, name="sync-dispatcher", daemon=True)

    def start(self) -> None:
        """Start dispatching in a background thread."""
        log.info("sync worker %s started with %d threads", self.owner, self.threads)
        self._dispatcher.start()
        if self.housekeeping is not None:
            self.housekeeping.start()

    def wake(self, booking_ids: list[str] | None = None) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking work, let the bookings in flight finish or give up, and release every lease."""
        started = self._dispatcher.ident is not None
        self._stop.set()
        self._wake.set()
        if self.housekeeping is not None:
            self.housekeeping.stop()
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._release_unstarted()
        if started:
            log.info("sync worker %s stopped", self.owner)

    def in_flight(self) -> int:
        """Return how many bookings are being synced right now."""
        with self._lock:
            return len(self._in_flight)

    def run_until_idle(self, timeout: float = 30.0) -> None:
        """Sync every due booking in the calling thread; for tests and one-shot commands."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            booking_ids = find_due_bookings(self.engine, 100)
            if not booking_ids:
                return
            for booking_id in booking_ids:
                if acquire_lease(self.engine, booking_id, self.owner, self.lease_seconds):
                    self._sync_booking(booking_id)
        raise TimeoutError(f"bookings were still due after {timeout} s")

    def _dispatch_forever(self) -> None:
        renew_every = self.lease_seconds / 3
        renewed_at = time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()
            try:
                if time.monotonic() - renewed_at >= renew_every:
                    self._renew_leases()
                    renewed_at = time.monotonic()
                dispatched, retry_in = self._dispatch_once()
            except Exception as error:  # the database is unreachable: keep trying at poll pace
                log.error("sync worker could not look for work: %s", error)
                dispatched, retry_in = 0, None
            if not dispatched:
                timeout = min(self.poll_seconds, renew_every)
                if retry_in is not None:
                    timeout = min(timeout, retry_in)
                self._wake.wait(timeout)

    def _renew_leases(self) -> None:
        with self._lock:
            booking_ids = set(self._in_flight)
        booking_ids |= self.booking_sync.held_leases()
        renewed = renew_leases(self.engine, booking_ids, self.owner, self.lease_seconds)
        if renewed < len(booking_ids):
            log.warning("sync worker %s: %d of %d leases were taken over before renewal",
                        self.owner, len(booking_ids) - renewed, len(booking_ids))

    def _dispatch_once(self) -> tuple[int, float | None]:
        """Hand due bookings to free threads; return how many, and when bookings passed over are ready."""
        with self._lock:
            free = self.threads - len(self._in_flight)
            busy = frozenset(self._in_flight)
            calls_ahead = Counter(target.acting_user for target in self._in_flight.values() if target is not None)
        if free <= 0:
            return 0, None

        backend = self.booking_sync.backend
        shortest_wait: float | None = None
        routes_left = MAX_ROUTES_PER_DISPATCH

        def ready_now(due: DueBooking) -> bool:
            nonlocal shortest_wait, routes_left
            target = due.target
            if target is None:
                if due.booking_id not in self._route_hints:
                    if routes_left == 0:
                        # Passed over. Every other wait recorded is longer, so the next search starts at once.
                        shortest_wait = MAX_DISPATCH_WAIT_SECONDS
                        return False
                    routes_left -= 1
                target = self._route_hint(due.booking_id)
            if target is None:  # the booking cannot be routed; its sync records why
                return True
            wait = backend.pacing_wait(target, calls_ahead[target.acting_user])
            if MAX_DISPATCH_WAIT_SECONDS < wait <= MAX_QUEUED_PACING_SECONDS:
                shortest_wait = wait if shortest_wait is None else min(shortest_wait, wait)
                return False
            calls_ahead[target.acting_user] += 1
            return True

        due = find_due(
            self.engine, free, exclude=busy, admit=ready_now, max_rows=MAX_ROWS_PER_DISPATCH, cursor=self._due_cursor,
        )
        if self._stop.is_set():
            return 0, None

        targets = {booking.booking_id: booking.target or self._route_hints.get(booking.booking_id) for booking in due}
        dispatched = 0
        for booking_id in acquire_leases(self.engine, list(targets), self.owner, self.lease_seconds):
            self._route_hints.pop(booking_id, None)  # its sync routes it, so a later search routes it anew
            with self._lock:
                self._in_flight[booking_id] = targets[booking_id]
            self._pool.submit(self._run_booking, booking_id)
            dispatched += 1

        retry_in = None if shortest_wait is None else max(shortest_wait - MAX_DISPATCH_WAIT_SECONDS, 0.001)
        return dispatched, retry_in

    def _route_hint(self, booking_id: str) -> Target | None:
        """Return the calendar a booking without a mapping will be routed to, for pacing only.

        A new booking has no mapping that names its calendar. Without this hint, a burst of one
        host's new bookings would take every thread, each waiting for that host's pacing slot. The
        route comes from the snapshot that the sync will apply, and is kept until the booking is
        handed to a thread, whose sync routes it again. None means it cannot be routed: the
        booking then goes to a thread at once, and its sync records why.
        """
        if booking_id in self._route_hints:
            self._route_hints.move_to_end(booking_id)
            return self._route_hints[booking_id]

        target = None
        try:
            body = newest_pending_body(self.engine, booking_id)
            if body:
                target = self.booking_sync.router.route(parse_envelope(body).payload)
        except (NoRouteError, ValueError):  # EnvelopeError is a ValueError
            pass
        except Exception as error:  # a failing hint must not stop the search for other bookings
            log.warning("booking %s: routing it for pacing failed, so it is not paced in the queue: %s",
                        booking_id, error)

        self._route_hints[booking_id] = target
        if len(self._route_hints) > MAX_ROUTE_HINTS:
            self._route_hints.popitem(last=False)
        return target

    def _run_booking(self, booking_id: str) -> None:
        try:
            self._sync_booking(booking_id)
        finally:
            with self._lock:
                self._in_flight.pop(booking_id, None)
            self._wake.set()

    def _sync_booking(self, booking_id: str) -> None:
        released = False
        try:
            while not self._stop.is_set():
                run = self.booking_sync.sync(booking_id, release_when_done=True)
                released = run.lease_released
                if released or not run.handled:
                    break
        except Exception:
            log.exception("booking %s: sync failed unexpectedly; its deliveries stay pending", booking_id)
        finally:
            if not released:
                self._release(booking_id)

    def _release_unstarted(self) -> None:
        """Release the bookings that were leased and queued, but whose sync never started."""
        with self._lock:
            unstarted = list(self._in_flight)
            self._in_flight.clear()
        for booking_id in unstarted:
            self._release(booking_id)

    def _release(self, booking_id: str) -> None:
        try:
            release_lease(self.engine, booking_id, self.owner)
        except Exception as error:
            log.error("booking %s: releasing the lease failed, it expires by itself: %s", booking_id, error)
