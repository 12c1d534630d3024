"""The per-file write lock of SQLite connections, and the synchronous levels of the connector's writes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from connector.intake import DeliveryIntake
from connector.sqlite_lock import LockingConnection, write_lock
from connector.storage import create_tables, make_engine


@pytest.fixture
def engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}", pool_size=4)
    create_tables(engine)
    yield engine
    engine.dispose()


def test_write_lock_shared_per_file(tmp_path):
    first = write_lock(str(tmp_path / "a.db"))

    assert write_lock(str(tmp_path / "." / "a.db")) is first
    assert write_lock(str(tmp_path / "b.db")) is not first
    assert write_lock(":memory:") is not write_lock(":memory:")


def test_write_transaction_holds_lock_until_commit(engine, tmp_path):
    lock = write_lock(str(tmp_path / "lock.db"))

    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        assert isinstance(connection.connection.driver_connection, LockingConnection)
        assert lock.locked()
    assert not lock.locked()


def test_write_lock_released_after_rollback(engine, tmp_path):
    lock = write_lock(str(tmp_path / "lock.db"))

    with pytest.raises(RuntimeError):
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t2 (x INTEGER)"))
            raise RuntimeError("abort")

    assert not lock.locked()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM sqlite_master WHERE name = 't2'")).scalar() == 0


def test_read_transaction_takes_no_lock(engine, tmp_path):
    from connector.storage import read_only

    lock = write_lock(str(tmp_path / "lock.db"))

    with read_only(engine).begin() as connection:
        connection.execute(text("SELECT 1"))
        assert not lock.locked()


def test_writers_wait_for_each_other(engine):
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE counter (n INTEGER)"))
        connection.execute(text("INSERT INTO counter VALUES (0)"))

    def add_one() -> None:
        for _ in range(20):
            with engine.begin() as connection:
                value = connection.execute(text("SELECT n FROM counter")).scalar()
                time.sleep(0.001)
                connection.execute(text("UPDATE counter SET n = :n"), {"n": value + 1})

    threads = [threading.Thread(target=add_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with engine.connect() as connection:
        assert connection.execute(text("SELECT n FROM counter")).scalar() == 80


def test_synchronous_levels(engine):
    intake = DeliveryIntake(engine)
    try:
        assert intake._sqlite.pragma("synchronous") == 2  # FULL
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        intake.close()

    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1
