"""Durable intake of deliveries: the receiver's only database write.

Concurrent requests hand their delivery to one writer thread, which inserts everything waiting in
one transaction and commits once, so many acknowledgements share one disk sync (group commit).
The event loop passes the deliveries of all requests handled in one loop iteration to the thread
together, so the thread wakes up once per batch rather than once per request.
The insert skips a delivery whose id or body digest is already stored, through the table's unique
constraints, so two receivers can never both accept the same delivery.

On SQLite the writer skips the ORM: it inserts a whole batch with one multi-row statement on the
engine's own sqlite3 connection (see `SqliteInserter`), and leaves WAL checkpoints to a thread of
their own (see `WalCheckpointer`). PostgreSQL and other databases go through SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

from connector.notify import notify_new_deliveries
from connector.sqlite_lock import LockingConnection
from connector.storage import SQLITE_SYNCHRONOUS, SQLITE_SYNCHRONOUS_DURABLE, Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)

MAX_BATCH = 256

# How long a request waits for the commit of its delivery before the receiver responds with 503.
# Commits take milliseconds, so only a database that stays locked or stuck reaches this, for
# example while another process holds SQLite's write lock. The commit may still succeed
# afterwards. The unique constraints then make Proximity's retry of that delivery a duplicate,
# so nothing is lost or stored twice.
ACK_TIMEOUT_SECONDS = 10.0


@dataclass(slots=True)
class DeliveryRecord:
    """A verified, parsed delivery, ready to be stored.

    Not frozen, because a frozen dataclass sets each field through `object.__setattr__`: that
    took 1.2 µs per record against 0.5, and the receiver makes one record per delivery.
    """

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


class IntakeError(RuntimeError):
    """The database stored a batch but the intake could not tell which of its deliveries were new."""


class IntakeTimeoutError(TimeoutError):
    """The database did not commit a delivery within the acknowledgement timeout."""


# A waiting caller: an asyncio future of a request handler, or a thread's concurrent future.
Waiter = asyncio.Future | Future
Batch = list[tuple[DeliveryRecord, Waiter]]
# The deliveries one event loop handed over together, and the timer that fails their requests
# with `IntakeTimeoutError` if the commit takes too long. A delivery stored from a thread has no timer.
Handover = tuple[Batch, asyncio.TimerHandle | None]
# The timers of the handovers in one write, each with its event loop, which alone may cancel it.
Timers = list[tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle]]


class DeliveryIntake:
    """Stores deliveries durably, batching concurrent commits."""

    def __init__(
        self,
        engine: Engine,
        on_commit: Callable[[list[str]], None] | None = None,
        ack_timeout: float | None = None,
    ) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._ack_timeout = ACK_TIMEOUT_SECONDS if ack_timeout is None else ack_timeout
        self._write_started: float | None = None  # time.monotonic() when the write in progress began
        self._queue: queue.SimpleQueue[Handover | None] = queue.SimpleQueue()
        self._gathering: dict[asyncio.AbstractEventLoop, Batch] = {}
        self._closed = False
        self._sqlite = SqliteInserter(engine) if engine.dialect.name == "sqlite" else None
        self._thread = threading.Thread(target=self._run, name="delivery-intake", daemon=True)
        self._thread.start()

        # RETURNING tells whether the row was inserted or skipped. The rowcount cannot: on
        # PostgreSQL it is -1, because SQLAlchemy fetches the primary key through RETURNING itself.
        # SQLite takes the `SqliteInserter` path instead.
        if engine.dialect.name == "postgresql":
            self._statement = postgresql.insert(Delivery).on_conflict_do_nothing().returning(Delivery.id)
        else:
            self._statement = insert(Delivery).returning(Delivery.id)

    async def store(self, record: DeliveryRecord) -> bool:
        """Store a delivery and wait for its commit; return False if it was already stored.

        Raises `IntakeTimeoutError` when the commit takes longer than the acknowledgement timeout.
        """
        if self._closed:
            raise IntakeClosedError("the delivery intake is stopped")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        gathering = self._gathering.setdefault(loop, [])
        gathering.append((record, waiter))
        if len(gathering) == 1:
            loop.call_soon(self._hand_over, loop)
        return await waiter

    @property
    def ack_timeout(self) -> float:
        """Seconds a request waits for its delivery's commit before it gets a 503 response."""
        return self._ack_timeout

    def write_seconds(self) -> float:
        """Return how long the write in progress has run, or 0 while the writer thread waits for deliveries."""
        started = self._write_started
        return 0.0 if started is None else time.monotonic() - started

    def store_blocking(self, record: DeliveryRecord) -> bool:
        """Store a delivery from a thread; return False if it was already stored."""
        future: Future[bool] = Future()
        self._queue.put(([(record, future)], None))
        return future.result()

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Pass the deliveries gathered in this loop iteration to the writer thread."""
        batch = self._gathering.pop(loop, None)
        if batch:  # `close` may have handed this loop's deliveries over already
            timer = loop.call_later(self._ack_timeout, _expire, [waiter for _, waiter in batch], self._ack_timeout)
            self._queue.put((batch, timer))

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._closed = True
        for loop in list(self._gathering):
            self._hand_over(loop)
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._sqlite is not None and not self._thread.is_alive():
            self._sqlite.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: Batch = []
            timers: Timers = []
            _add_handover(first, batch, timers)
            stopping = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                _add_handover(more, batch, timers)

            self._write_started = time.monotonic()
            if self._sqlite is not None:
                self._write_sqlite(batch, timers)
            else:
                self._write(batch, timers)
            self._write_started = None
            if stopping:
                return

    def _write_sqlite(self, batch: Batch, timers: Timers) -> None:
        records = [record for record, _ in batch]
        try:
            results = self._sqlite.insert(records, utcnow())
        except Exception as error:  # the database failed, so every waiting request gets a 503
            log.error("storing %d deliveries failed: %s", len(batch), error)
            _settle(batch, error, timers)
            return

        _settle(batch, results, timers)
        self._report_commit(records, results)

    def _write(self, batch: Batch, timers: Timers) -> None:
        # Receivers sharing a PostgreSQL database insert in delivery id order, so two batches that
        # hold the same ids wait for each other instead of deadlocking on the unique index.
        # NOTE: equal bodies under different delivery ids can still deadlock, and then every
        # delivery of the losing batch gets 503 and is sent again by Proximity.
        batch = sorted(batch, key=lambda item: item[0].delivery_id)
        now = utcnow()
        try:
            with self._engine.begin() as connection:
                results = [connection.execute(self._statement, _row(record, now)).first() is not None for record, _ in batch]
                if any(results):
                    notify_new_deliveries(connection)
        except Exception as error:  # the database failed: every waiting request answers 503
            log.error("storing %d deliveries failed: %s", len(batch), error)
            _settle(batch, error, timers)
            return

        _settle(batch, results, timers)
        self._report_commit([record for record, _ in batch], results)

    def _report_commit(self, records: Sequence[DeliveryRecord], results: Sequence[bool]) -> None:
        pending = [record.booking_id for record, stored in zip(records, results)
                   if stored and record.state == DeliveryState.PENDING and record.booking_id]
        if pending and self._on_commit is not None:
            self._on_commit(pending)


class SqliteInserter:
    """Inserts batches of deliveries into SQLite with one multi-row statement each.

    It uses a connection of the engine's pool, so the PRAGMAs of connector/storage.py apply (WAL,
    busy timeout), in the engine's autocommit mode: each statement is its own transaction. The
    connection runs at synchronous=FULL while it is the inserter's, so the commit has synced the
    WAL to disk when the statement returns. A statement
    is one call into SQLite, which the writer thread makes without holding the GIL, where the ORM
    path makes several calls per row and holds the GIL between them. Must be used from one thread.
    """

    COLUMNS = (
        "delivery_id", "body_digest", "event", "version", "rank", "booking_id", "body",
        "received_at", "state", "attempts", "next_attempt_at", "finished_at",
    )

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pooled: Any = None
        self._checkpointer: WalCheckpointer | None = None
        self._statements: dict[int, str] = {}
        received_at = Delivery.__table__.c.received_at.type
        # The column type's own conversion, so times are stored exactly as SQLAlchemy writes them.
        self._store_time = received_at.dialect_impl(engine.dialect).bind_processor(engine.dialect) or (lambda value: value)

    def insert(self, records: Sequence[DeliveryRecord], now: datetime) -> list[bool]:
        """Insert the records; return for each whether it was stored (False: a duplicate)."""
        connection = self._connection()
        stored_now = self._store_time(now)
        rows = [
            (record.delivery_id, record.body_digest, record.event, record.version, record.rank, record.booking_id,
             record.body, stored_now, record.state, 0, stored_now,
             None if record.state == DeliveryState.PENDING else stored_now)
            for record in records
        ]

        per_statement = max(1, connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(self.COLUMNS))
        results: list[bool] = []
        try:
            with connection.writing():
                for start in range(0, len(rows), per_statement):
                    chunk = slice(start, start + per_statement)
                    results += self._insert_rows(connection, rows[chunk], records[chunk])
                if connection.in_transaction:  # a connection outside autocommit mode opened a transaction
                    connection.commit()
        except sqlite3.Error:
            self.close(invalidate=True)
            raise

        if self._checkpointer is not None:
            self._checkpointer.committed(len(rows))
        return results

    def pragma(self, name: str) -> Any:
        """Return the value of PRAGMA `name` on the inserter's connection, such as its synchronous level."""
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a PRAGMA name")
        return self._connection().execute(f"PRAGMA {name}").fetchone()[0]

    def close(self, invalidate: bool = False) -> None:
        """Give the connection back to the pool, or discard it after an error, and stop the checkpoints."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._pooled is None:
            return
        if invalidate:
            self._pooled.invalidate()
        else:
            connection = self._pooled.driver_connection
            connection.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            connection.execute(f"PRAGMA wal_autocheckpoint={SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES}")
            self._pooled.close()
        self._pooled = None

    def _connection(self) -> LockingConnection:
        if self._pooled is None:
            self._pooled = self._engine.raw_connection()
            connection = self._pooled.driver_connection
            connection.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS_DURABLE}")
            if connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                connection.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_AUTOCHECKPOINT_PAGES}")
                self._checkpointer = WalCheckpointer(self._engine)
        return self._pooled.driver_connection

    def _insert_rows(self, connection: sqlite3.Connection, rows: list[tuple], records: Sequence[DeliveryRecord]) -> list[bool]:
        cursor = connection.execute(self._statement(len(rows)), [value for row in rows for value in row])
        inserted = cursor.rowcount
        if inserted == len(rows):
            return [True] * len(rows)
        if inserted == 0:
            return [False] * len(rows)

        # Some rows were duplicates. SQLite gives each new row the largest rowid plus one, and no
        # other connection writes during the statement, so the new rows are the last `inserted`
        # rowids up to last_insert_rowid().
        last = cursor.lastrowid
        stored_ids = {
            delivery_id for (delivery_id,) in connection.execute(
                "SELECT delivery_id FROM deliveries WHERE id > ? AND id <= ?", (last - inserted, last)
            )
        }
        if len(stored_ids) != inserted:
            raise IntakeError(f"stored {inserted} of {len(rows)} deliveries but found {len(stored_ids)} new rows")

        results = []
        for record in records:
            # Two records with the same id in one batch: only the first was inserted.
            results.append(record.delivery_id in stored_ids)
            stored_ids.discard(record.delivery_id)
        return results

    def _statement(self, rows: int) -> str:
        statement = self._statements.get(rows)
        if statement is None:
            placeholders = "(" + ", ".join("?" * len(self.COLUMNS)) + ")"
            statement = (
                f"INSERT INTO deliveries ({', '.join(self.COLUMNS)}) VALUES "
                + ", ".join([placeholders] * rows)
                + " ON CONFLICT DO NOTHING"
            )
            self._statements[rows] = statement
        return statement


# SQLite's default `wal_autocheckpoint`, restored when the inserter gives its connection back.
SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES = 1000

# The inserter's own automatic checkpoint, a fallback for a checkpoint thread that falls behind.
FALLBACK_AUTOCHECKPOINT_PAGES = 4000

# Deliveries committed between two checkpoints of `WalCheckpointer`; each adds about 3 WAL pages.
CHECKPOINT_AFTER_ROWS = 16


class WalCheckpointer:
    """Runs SQLite's WAL checkpoints in a thread of their own, after the inserter's commits.

    A checkpoint copies the pages committed to the WAL back into the database file and syncs that
    file. With the default automatic checkpoint, the commit that filled the WAL to 1,000 pages ran
    it, so every delivery of that batch waited for it. Here a passive checkpoint runs on its own
    connection once `CHECKPOINT_AFTER_ROWS` deliveries have been committed since the last one. A
    passive checkpoint waits for no reader or writer (SQLite's `sqlite3_wal_checkpoint_v2`
    documentation), so the inserter's commits go on meanwhile. It usually finishes before the next commit, which then starts
    the WAL over from its beginning. This raised `serve --no-worker` from 7,574 to 8,906
    deliveries per second and lowered its p99 ack latency from 15.5 to 5.7 ms (medians of 3 runs
    of `python -m bench --only receiver`, 2-core VM). Under that load a batch contains about 16
    deliveries, so a checkpoint follows nearly every commit. At the worker benchmark's rate of
    one or two deliveries per commit, a checkpoint after every commit cost about 4 % of the
    worker's throughput. The inserter still checkpoints by itself once the WAL holds
    `FALLBACK_AUTOCHECKPOINT_PAGES`, in case this thread falls behind.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._rows_since_request = 0
        self._requested = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, rows: int) -> None:
        """Count rows the inserter committed, and ask for a checkpoint once enough have gathered."""
        self._rows_since_request += rows
        if self._rows_since_request >= CHECKPOINT_AFTER_ROWS:
            self._rows_since_request = 0
            self._requested.set()

    def stop(self) -> None:
        """Stop the thread after the checkpoint in progress, if any."""
        self._stopping = True
        self._requested.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        pooled = None
        failing = False
        while True:
            self._requested.wait()
            self._requested.clear()
            if self._stopping:
                break

            # A failed checkpoint is retried at the next request, and the fallback still applies meanwhile.
            try:
                if pooled is None:
                    pooled = self._engine.raw_connection()
                pooled.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception as error:
                if not failing:
                    log.warning("WAL checkpoint failed, retrying at the next request: %s", error)
                failing = True
                if pooled is not None:
                    pooled.invalidate()
                    pooled = None
                continue
            if failing:
                log.info("WAL checkpoints work again")
                failing = False

        if pooled is not None:
            pooled.close()


def _add_handover(handover: Handover, batch: Batch, timers: Timers) -> None:
    deliveries, timer = handover
    batch += deliveries
    if timer is not None:
        timers.append((deliveries[0][1].get_loop(), timer))


def _settle(batch: Batch, outcome: Sequence[bool] | BaseException, timers: Timers) -> None:
    """Hand each waiting caller its result or the error: threads at once, each event loop in one callback.

    The callback also cancels the batch's timeouts, because a timer may be cancelled only in its
    own loop. A cancelled timer drops its list of waiters, which is then not kept until the timeout.
    """
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool | BaseException]]] = {}
    for index, (_, waiter) in enumerate(batch):
        result = outcome if isinstance(outcome, BaseException) else outcome[index]
        if isinstance(waiter, asyncio.Future):
            per_loop.setdefault(waiter.get_loop(), []).append((waiter, result))
        elif isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    timers_per_loop: dict[asyncio.AbstractEventLoop, list[asyncio.TimerHandle]] = {}
    for loop, timer in timers:
        timers_per_loop.setdefault(loop, []).append(timer)

    for loop, results in per_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_in_loop, results, timers_per_loop.get(loop, ()))
        except RuntimeError:  # the loop is closed, so no request waits any more
            log.warning("%d stored deliveries had no request left to answer: the event loop is closed", len(results))


def _expire(waiters: list[Waiter], timeout: float) -> None:
    """Fail the requests whose delivery is still not committed, so each gets a 503 response."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(IntakeTimeoutError(f"the database did not commit the delivery within {timeout:g} s"))


def _settle_in_loop(
    results: list[tuple[asyncio.Future, bool | BaseException]], timers: Sequence[asyncio.TimerHandle]
) -> None:
    for timer in timers:
        timer.cancel()

    for waiter, result in results:
        if waiter.done():  # the request timed out, or was cancelled because the client went away
            continue
        if isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)


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
