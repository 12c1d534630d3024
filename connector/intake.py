"""Durable intake of deliveries: the receiver's only database write.

Concurrent requests hand their delivery to one writer thread, which inserts everything waiting in
one transaction and commits once, so many acknowledgements share one disk sync (group commit).
The insert skips a delivery whose id or body digest is already stored, through the table's unique
constraints, so two receivers can never both accept the same delivery.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from connector.storage import Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)

MAX_BATCH = 256


@dataclass(frozen=True)
class DeliveryRecord:
    """A verified, parsed delivery, ready to be stored."""

    delivery_id: str
    body_digest: str
    event: str
    version: str
    rank: int
    booking_id: str | None
    body: bytes
    state: str


class IntakeClosedError(RuntimeError):
    """The intake was stopped and accepts no more deliveries."""


class DeliveryIntake:
    """Stores deliveries durably, batching concurrent commits."""

    def __init__(self, engine: Engine, on_commit: Callable[[list[str]], None] | None = None) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[tuple[DeliveryRecord, Future[bool]] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="delivery-intake", daemon=True)
        self._thread.start()

        dialect = engine.dialect.name
        if dialect == "postgresql":
            self._statement = postgresql.insert(Delivery).on_conflict_do_nothing()
        elif dialect == "sqlite":
            self._statement = sqlite.insert(Delivery).on_conflict_do_nothing()
        else:
            self._statement = insert(Delivery)

    async def store(self, record: DeliveryRecord) -> bool:
        """Store a delivery and wait for its commit; return False if it was already stored."""
        future: Future[bool] = Future()
        if self._closed:
            raise IntakeClosedError("the delivery intake is stopped")
        self._queue.put((record, future))
        return await asyncio.wrap_future(future)

    def store_blocking(self, record: DeliveryRecord) -> bool:
        """Store a delivery from a thread; return False if it was already stored."""
        future: Future[bool] = Future()
        self._queue.put((record, future))
        return future.result()

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)

            self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[tuple[DeliveryRecord, Future[bool]]]) -> None:
        now = utcnow()
        try:
            with self._engine.begin() as connection:
                results = [connection.execute(self._statement, _row(record, now)).rowcount == 1 for record, _ in batch]
        except Exception as error:  # the database failed: every waiting request answers 503
            log.error("storing %d deliveries failed: %s", len(batch), error)
            for _, future in batch:
                future.set_exception(error)
            return

        for (_, future), stored in zip(batch, results):
            future.set_result(stored)

        pending = [record.booking_id for (record, _), stored in zip(batch, results)
                   if stored and record.state == DeliveryState.PENDING and record.booking_id]
        if pending and self._on_commit is not None:
            self._on_commit(pending)


def _row(record: DeliveryRecord, now: datetime) -> dict:
    return {
        "delivery_id": record.delivery_id,
        "body_digest": record.body_digest,
        "event": record.event,
        "version": record.version,
        "rank": record.rank,
        "booking_id": record.booking_id,
        "body": record.body,
        "received_at": now,
        "state": record.state,
        "attempts": 0,
        "next_attempt_at": now,
        "finished_at": now if record.state != DeliveryState.PENDING else None,
    }
