"""The sync worker: hands due bookings to a pool of threads, one booking per thread at a time.

A dispatcher thread finds bookings with due deliveries, takes each one's lease, and submits it to
the pool. It wakes at once when the receiver in the same process commits a delivery, and polls
otherwise, which is how a worker in a separate process sees new deliveries.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.engine import Engine

from connector.queue import acquire_lease, find_due_bookings, release_lease
from connector.sync import BookingSync

log = logging.getLogger(__name__)


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
    ) -> None:
        self.engine = engine
        self.booking_sync = booking_sync
        self.owner = booking_sync.owner
        self.threads = threads
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sync")
        self._dispatcher = threading.Thread(target=self._dispatch_forever, name="sync-dispatcher", daemon=True)

    def start(self) -> None:
        """Start dispatching in a background thread."""
        log.info("sync worker %s started with %d threads", self.owner, self.threads)
        self._dispatcher.start()

    def wake(self, booking_ids: list[str] | None = None) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking work, let the bookings in flight finish, and release their leases."""
        self._stopping.set()
        self._wake.set()
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        log.info("sync worker %s stopped", self.owner)

    def in_flight(self) -> int:
        """Return how many bookings are being synced right now."""
        with self._lock:
            return len(self._in_flight)

    def run_until_idle(self, timeout: float = 30.0) -> None:
        """Sync every due booking in the calling thread; for tests and one-shot commands."""
        import time

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
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                dispatched = self._dispatch_once()
            except Exception as error:  # the database is unreachable: keep trying at poll pace
                log.error("sync worker could not look for work: %s", error)
                dispatched = 0
            if not dispatched:
                self._wake.wait(self.poll_seconds)

    def _dispatch_once(self) -> int:
        with self._lock:
            free = self.threads - len(self._in_flight)
            busy = frozenset(self._in_flight)
        if free <= 0:
            return 0

        dispatched = 0
        for booking_id in find_due_bookings(self.engine, free, exclude=busy):
            if self._stopping.is_set():
                break
            if not acquire_lease(self.engine, booking_id, self.owner, self.lease_seconds):
                continue
            with self._lock:
                self._in_flight.add(booking_id)
            self._pool.submit(self._run_booking, booking_id)
            dispatched += 1
        return dispatched

    def _run_booking(self, booking_id: str) -> None:
        try:
            self._sync_booking(booking_id)
        finally:
            with self._lock:
                self._in_flight.discard(booking_id)
            self._wake.set()

    def _sync_booking(self, booking_id: str) -> None:
        try:
            while not self._stopping.is_set():
                if not self.booking_sync.sync(booking_id):
                    break
        except Exception:
            log.exception("booking %s: sync failed unexpectedly; its deliveries stay pending", booking_id)
        finally:
            try:
                release_lease(self.engine, booking_id, self.owner)
            except Exception as error:
                log.error("booking %s: releasing the lease failed, it expires by itself: %s", booking_id, error)
