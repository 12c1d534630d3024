"""One write lock per SQLite database file and process, which writing threads queue on.

SQLite lets one connection write at a time. A connection that finds the database locked waits in
SQLite's busy handler (`sqliteDefaultBusyCallback` in SQLite's src/main.c, built with usleep).
That handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms between retries, so
a waiting thread can sleep long after the lock is free. Here a thread first takes a
`threading.Lock` for the file and then the SQLite lock, so it wakes as soon as the previous writer
of this process commits.

NOTE: this orders the writers of one process only. Writers in separate processes, such as
`serve --no-worker` beside `proximity-sync worker` on one SQLite file, still meet in SQLite's busy
handler; PostgreSQL is the database for several processes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def write_lock(database: str) -> threading.Lock:
    """Return the process's write lock of a database file; an in-memory database gets its own."""
    if database in ("", ":memory:") or database.startswith("file:"):
        return threading.Lock()
    key = os.path.realpath(database)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class LockingConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions hold the file's process-wide write lock.

    `begin_write` takes the lock, then starts the transaction with `BEGIN IMMEDIATE`. The lock is
    released when `commit`, `rollback` or `close` ends the transaction, after SQLite has done so,
    so the next writer never finds the database locked by this process.
    """

    def __init__(self, database: str, *args, **kwargs) -> None:
        super().__init__(database, *args, **kwargs)
        self._write_lock = write_lock(str(database))
        self._holds_lock = False

    def begin_write(self) -> None:
        """Take the write lock and start a transaction that may write."""
        self._write_lock.acquire()
        self._holds_lock = True
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the write lock around statements that run in autocommit mode."""
        with self._write_lock:
            yield

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._holds_lock:
            self._holds_lock = False
            self._write_lock.release()
