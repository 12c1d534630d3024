"""The delivery intake on SQLite: which deliveries count as stored, what the rows hold, and errors."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine

from connector.intake import (
    CHECKPOINT_AFTER_ROWS,
    FALLBACK_AUTOCHECKPOINT_PAGES,
    SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES,
    DeliveryIntake,
    DeliveryRecord,
    IntakeClosedError,
    IntakeTimeoutError,
    SqliteInserter,
    _row,
)
from connector.storage import Delivery, DeliveryState, create_tables, make_engine, utcnow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'intake.db'}", pool_size=2)
    create_tables(engine)
    yield engine
    engine.dispose()


def record(delivery_id: str, body: bytes | None = None, *, state: str = DeliveryState.PENDING, booking_id: str | None = "bkg_1") -> DeliveryRecord:
    body = body if body is not None else f'{{"delivery": "{delivery_id}", "name": "Zoë"}}'.encode()
    return DeliveryRecord(
        delivery_id=delivery_id,
        body_digest=hashlib.sha256(body).hexdigest(),
        event="booking.created",
        version="2026-03-16T14:05:00.000000Z",
        rank=0,
        booking_id=booking_id,
        body=body,
        state=state,
    )


def stored_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(select(Delivery.delivery_id).order_by(Delivery.id)).scalars())


def test_inserter_marks_new_rows_stored(engine):
    inserter = SqliteInserter(engine)

    results = inserter.insert([record("d1"), record("d2"), record("d3")], utcnow())

    assert results == [True, True, True]
    assert stored_ids(engine) == ["d1", "d2", "d3"]
    inserter.close()


def test_inserter_marks_each_duplicate(engine):
    inserter = SqliteInserter(engine)
    inserter.insert([record("old-1"), record("old-2", b'{"same": "body"}')], utcnow())

    batch = [
        record("new-1"),
        record("old-1"),                         # stored delivery id
        record("new-2", b'{"same": "body"}'),    # stored body under a new id
        record("new-3"),
        record("new-3"),                         # same id twice in one batch
        record("new-4", b'{"twin": 1}'),
        record("new-5", b'{"twin": 1}'),         # same body twice in one batch
    ]
    results = inserter.insert(batch, utcnow())

    assert results == [True, False, False, True, False, True, False]
    assert stored_ids(engine) == ["old-1", "old-2", "new-1", "new-3", "new-4"]
    inserter.close()


def test_inserter_splits_statements_at_variable_limit(engine):
    inserter = SqliteInserter(engine)
    connection = inserter._connection()
    connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, len(SqliteInserter.COLUMNS) * 2)

    results = inserter.insert([record(f"d{index}") for index in range(5)] + [record("d0")], utcnow())

    assert results == [True, True, True, True, True, False]
    assert stored_ids(engine) == [f"d{index}" for index in range(5)]
    inserter.close()


def test_inserter_rows_match_sqlalchemy_rows(engine):
    now = utcnow()
    inserter = SqliteInserter(engine)
    inserter.insert([record("raw"), record("raw-ignored", state=DeliveryState.IGNORED, booking_id=None)], now)
    inserter.close()
    with engine.begin() as connection:
        connection.execute(insert(Delivery), _row(record("orm"), now))
        connection.execute(insert(Delivery), _row(record("orm-ignored", state=DeliveryState.IGNORED, booking_id=None), now))

    columns = [name for name in SqliteInserter.COLUMNS if name not in ("delivery_id", "body_digest", "body")]
    with engine.connect() as connection:
        raw = {row.delivery_id: row for row in connection.execute(text(f"SELECT delivery_id, {', '.join(columns)} FROM deliveries"))}
    for column in columns:
        assert getattr(raw["raw"], column) == getattr(raw["orm"], column), column
        assert getattr(raw["raw-ignored"], column) == getattr(raw["orm-ignored"], column), column

    with engine.connect() as connection:
        loaded = {row.delivery_id: row for row in connection.execute(select(Delivery))}
    assert loaded["raw"].received_at == now
    assert loaded["raw"].next_attempt_at == now
    assert loaded["raw"].finished_at is None
    assert loaded["raw-ignored"].finished_at == now
    assert loaded["raw"].body == record("raw").body


def ids_in_database_file(database: Path, copy: Path) -> list[str]:
    """Return the delivery ids in the database file alone, leaving out what is only in its WAL."""
    shutil.copyfile(database, copy)
    connection = sqlite3.connect(copy)
    try:
        return [row[0] for row in connection.execute("SELECT delivery_id FROM deliveries ORDER BY id")]
    except sqlite3.DatabaseError:  # copied while a checkpoint was writing the file
        return []
    finally:
        connection.close()


def test_checkpoint_thread_copies_commits_into_database_file(engine, tmp_path):
    inserter = SqliteInserter(engine)
    first = [f"d{number:02}" for number in range(CHECKPOINT_AFTER_ROWS)]
    inserter.insert([record(delivery_id) for delivery_id in first], utcnow())

    # These rows are far below the inserter's own checkpoint threshold, so only the thread copies them.
    deadline = time.monotonic() + 10
    copied = ids_in_database_file(tmp_path / "intake.db", tmp_path / "copy.db")
    while copied != first and time.monotonic() < deadline:
        time.sleep(0.02)
        copied = ids_in_database_file(tmp_path / "intake.db", tmp_path / "copy.db")

    # One more row does not reach the threshold again, so it stays in the WAL.
    inserter.insert([record("late")], utcnow())
    time.sleep(0.2)
    copied_later = ids_in_database_file(tmp_path / "intake.db", tmp_path / "copy.db")
    inserter.close()

    assert copied == first
    assert copied_later == first
    assert stored_ids(engine) == first + ["late"]


def test_inserter_pragma_rejects_non_name(engine):
    inserter = SqliteInserter(engine)

    with pytest.raises(ValueError, match="is not a PRAGMA name"):
        inserter.pragma("synchronous; DROP TABLE deliveries")
    assert inserter.pragma("journal_mode") == "wal"
    inserter.close()


def test_inserter_checkpoints_itself_only_as_fallback(engine):
    inserter = SqliteInserter(engine)
    inserter.insert([record("d1")], utcnow())
    connection = inserter._connection()  # kept to read the PRAGMA after close() gave it back to the pool

    assert inserter.pragma("wal_autocheckpoint") == FALLBACK_AUTOCHECKPOINT_PAGES
    inserter.close()
    assert connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES
    assert "wal-checkpoint" not in [thread.name for thread in threading.enumerate()]


def test_store_blocking_commits_before_returning(engine, tmp_path):
    intake = DeliveryIntake(engine)

    assert intake.store_blocking(record("d1")) is True
    reader = sqlite3.connect(tmp_path / "intake.db")
    try:
        assert reader.execute("SELECT delivery_id FROM deliveries").fetchall() == [("d1",)]
    finally:
        reader.close()
    assert intake.store_blocking(record("d1")) is False
    intake.close()


def test_store_answers_concurrent_requests(engine):
    committed: list[list[str]] = []
    intake = DeliveryIntake(engine, on_commit=committed.append)

    async def store_all() -> list[bool]:
        records = [record(f"d{index}", booking_id=f"bkg_{index}") for index in range(20)]
        return await asyncio.gather(*(intake.store(item) for item in records + [record("d3")]))

    results = asyncio.run(store_all())
    intake.close()

    assert results == [True] * 20 + [False]
    assert sorted(booking for batch in committed for booking in batch) == sorted(f"bkg_{index}" for index in range(20))


def test_store_raises_database_error_then_recovers(engine):
    intake = DeliveryIntake(engine)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE deliveries RENAME TO deliveries_away"))

    with pytest.raises(sqlite3.OperationalError):
        intake.store_blocking(record("d1"))

    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE deliveries_away RENAME TO deliveries"))
    assert intake.store_blocking(record("d1")) is True
    intake.close()


def test_store_after_close_raises(engine):
    intake = DeliveryIntake(engine)
    intake.close()

    with pytest.raises(IntakeClosedError):
        asyncio.run(intake.store(record("d1")))


def test_close_stores_gathered_deliveries(engine):
    intake = DeliveryIntake(engine)

    async def store_then_close() -> bool:
        pending = asyncio.ensure_future(intake.store(record("d1")))
        await asyncio.sleep(0)  # the store runs and gathers its delivery, but the hand-over waits for the next iteration
        intake.close()
        return await asyncio.wait_for(pending, timeout=5)

    assert asyncio.run(store_then_close()) is True
    assert stored_ids(engine) == ["d1"]


def test_store_times_out_while_database_locked(engine, tmp_path):
    intake = DeliveryIntake(engine, ack_timeout=0.3)
    other = sqlite3.connect(tmp_path / "intake.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction holds SQLite's write lock

    async def store_while_locked() -> tuple[BaseException | bool, float]:
        started = time.monotonic()
        try:
            outcome = await intake.store(record("d1"))
        except IntakeTimeoutError as error:
            outcome = error
        waited = time.monotonic() - started
        other.execute("ROLLBACK")  # the writer thread, still waiting, now commits the delivery
        return outcome, waited

    outcome, waited = asyncio.run(store_while_locked())
    other.close()

    assert isinstance(outcome, IntakeTimeoutError)
    assert str(outcome) == "the database did not commit the delivery within 0.3 s"
    assert 0.3 <= waited < 2.0
    assert intake.store_blocking(record("d1")) is False  # the retry finds the late commit
    assert stored_ids(engine) == ["d1"]
    intake.close()


def test_store_cancels_timeout_after_commit(engine):
    intake = DeliveryIntake(engine, ack_timeout=0.2)

    async def store_then_wait() -> list[bool]:
        results = [await intake.store(record("d1")), await intake.store(record("d2"))]
        await asyncio.sleep(0.4)  # past the timeout, which must not touch requests that already have their result
        loop = asyncio.get_running_loop()
        assert all(timer.cancelled() for timer in loop._scheduled)  # noqa: SLF001  (asyncio's timer heap)
        return results

    assert asyncio.run(store_then_wait()) == [True, True]
    intake.close()
