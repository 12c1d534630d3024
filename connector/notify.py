"""Waking idle workers in other processes when a receiver stores a delivery (PostgreSQL only).

The intake sends `NOTIFY` inside the transaction that stores deliveries, so PostgreSQL delivers
it when that transaction commits, and never for a rolled-back one. Each worker process listens
on a dedicated psycopg connection in a background thread and wakes its dispatcher. A missed
notification costs only latency: the dispatcher still polls every WORKER_POLL_SECONDS.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from connector.storage import POSTGRESQL_CONNECT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

CHANNEL = "proximity_sync_deliveries"

# How long one wait for notifications lasts, so a stop request is noticed within this time.
LISTEN_WAIT_SECONDS = 0.25
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0


def notify_new_deliveries(connection: Connection) -> None:
    """Queue a wake-up for listening workers, sent by PostgreSQL when the transaction commits."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class DeliveryListener:
    """Calls `on_notify` whenever another process stores deliveries, until stopped.

    It also calls `on_notify` after each (re)connection, because no listener received the
    notifications of deliveries stored while it was disconnected.
    """

    def __init__(self, engine: Engine, on_notify: Callable[[], None]) -> None:
        self._connect_arguments = _psycopg_arguments(engine)
        self._on_notify = on_notify
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen_forever, name="delivery-listener", daemon=True)

    def start(self) -> None:
        """Start listening in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop; it closes its connection within LISTEN_WAIT_SECONDS."""
        self._stopping.set()

    def join(self, timeout: float = 5.0) -> None:
        """Wait until the thread has stopped and closed its connection."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_listening(self, timeout: float) -> bool:
        """Wait until the LISTEN is in place; return False if it is not within `timeout` seconds."""
        return self._listening.wait(timeout)

    def _listen_forever(self) -> None:
        # Imported here so that SQLite deployments never load the PostgreSQL driver.
        import psycopg

        delay = RECONNECT_MIN_SECONDS
        while not self._stopping.is_set():
            try:
                self._listen()
                delay = RECONNECT_MIN_SECONDS
            except psycopg.Error as error:
                if self._listening.is_set():
                    # A connection that worked until now was dropped: retry soon, then back off.
                    delay = RECONNECT_MIN_SECONDS
                self._listening.clear()
                log.warning(
                    "listening for new deliveries failed, reconnecting in %.1f s (polling continues meanwhile): %s",
                    delay, error,
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _listen(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self._connect_arguments, autocommit=True) as connection:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            self._listening.set()
            log.info("listening for new deliveries on PostgreSQL channel %s", CHANNEL)
            self._on_notify()

            while not self._stopping.is_set():
                for _notification in connection.notifies(timeout=LISTEN_WAIT_SECONDS):
                    self._on_notify()
        self._listening.clear()


def _psycopg_arguments(engine: Engine) -> dict[str, Any]:
    """Return psycopg.connect() arguments for the engine's database, from its URL."""
    _, arguments = engine.dialect.create_connect_args(engine.url)
    # SQLAlchemy's adapter map is for its own pooled connections; a raw connection uses the default.
    arguments.pop("context", None)
    arguments.setdefault("connect_timeout", POSTGRESQL_CONNECT_TIMEOUT_SECONDS)
    return arguments
