"""Database tables and engine.

SQLite (the embedded default) and PostgreSQL hold the same tables. Times are aware UTC datetimes,
which SQLModel's datetime columns require and return.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Column, Index, LargeBinary, Table, Text, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlmodel import Field, SQLModel, create_engine

from connector.sqlite_lock import LockingConnection


# A connection attempt to an unreachable PostgreSQL server fails after this long, so the
# receiver returns 503 instead of hanging. A `connect_timeout` in DATABASE_URL overrides it.
POSTGRESQL_CONNECT_TIMEOUT_SECONDS = 10


# The execution option that `read_only` sets, read by the SQLite `begin` listener.
SQLITE_READ_ONLY_OPTION = "proximity_read_only"

# The synchronous level of every SQLite connection, and the stricter one of the receiver's inserts.
SQLITE_SYNCHRONOUS = "NORMAL"
SQLITE_SYNCHRONOUS_DURABLE = "FULL"


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class DeliveryState:
    """The states of a stored delivery."""

    PENDING = "pending"
    APPLIED = "applied"
    STALE = "stale"
    IGNORED = "ignored"
    FAILED = "failed"

    ALL = (PENDING, APPLIED, STALE, IGNORED, FAILED)


class Delivery(SQLModel, table=True):
    """One webhook delivery, stored before it is acknowledged."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "state", "next_attempt_at"),
        # All three columns, so SQLite's planner takes this index and not `ix_deliveries_due`
        # for a booking's pending or due deliveries (see migration 0002).
        Index("ix_deliveries_booking_due", "booking_id", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(unique=True, max_length=200)
    body_digest: str = Field(unique=True, max_length=64)
    event: str = Field(max_length=100)
    version: str = Field(max_length=40, description="Envelope createdAt as fixed-width UTC text.")
    rank: int = 0
    booking_id: str | None = Field(default=None, max_length=200)
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    received_at: datetime = Field(default_factory=utcnow)
    state: str = Field(default=DeliveryState.PENDING, max_length=20)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    outcome: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    finished_at: datetime | None = None


class BookingMapping(SQLModel, table=True):
    """Which calendar event belongs to which booking: the only record of that link."""

    __tablename__ = "booking_mappings"

    booking_id: str = Field(primary_key=True, max_length=200)
    calendar_id: str | None = Field(default=None, max_length=300)
    acting_user: str | None = Field(default=None, max_length=300)
    event_id: str | None = Field(default=None, max_length=1024)
    generation: int = 0
    state: str = Field(default="none", max_length=20)
    version: str | None = Field(default=None, max_length=40)
    rank: int = 0
    event_digest: str | None = Field(default=None, max_length=64)
    field_digests: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    carried_to: str | None = Field(default=None, max_length=200)
    last_delivery_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class BookingLease(SQLModel, table=True):
    """A worker's claim on a booking, so two workers never sync one booking at once."""

    __tablename__ = "booking_leases"

    booking_id: str = Field(primary_key=True, max_length=200)
    owner: str = Field(max_length=200)
    expires_at: datetime


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """Create the engine; SQLite gets WAL, a busy timeout, and write-locking transactions.

    PostgreSQL connections are checked before each use (`pool_pre_ping`), so a pool that
    outlived a database restart or a dropped connection reconnects instead of failing.
    """
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            connect_args={
                "check_same_thread": False, "timeout": 30, "isolation_level": None, "factory": LockingConnection,
            },
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine

    url = parse_database_url(database_url)
    connect_args = {}
    if url.get_dialect().name == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT_SECONDS
    return create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, connect_args=connect_args
    )


def parse_database_url(database_url: str) -> URL:
    """Parse the URL, choosing psycopg 3 for a PostgreSQL URL that names no driver.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which the connector does not install.
    """
    url = make_url(database_url)
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def explain_database_error(database_url: str, error: DBAPIError) -> tuple[str, str]:
    """Return what is wrong with the database behind `error`, and what to do, as two phrases.

    Both name the database by its path or by its URL with the password hidden, and the driver's
    message has any password in the URL masked too.
    """
    url = parse_database_url(database_url)
    location = url.render_as_string(hide_password=True)
    reason = str(error.orig)
    if url.password:
        reason = reason.replace(str(url.password), "***")

    code = getattr(error.orig, "sqlite_errorcode", None)
    if url.get_backend_name() == "sqlite" and url.database and code == sqlite3.SQLITE_NOTADB:
        path = Path(url.database).resolve()
        return (
            f"DATABASE_URL {location} names {path}, which is not a SQLite database",
            f"point DATABASE_URL at the connector's database, or move {path} away so that the connector creates a new one",
        )
    if url.get_backend_name() == "sqlite" and url.database and code == sqlite3.SQLITE_CORRUPT:
        path = Path(url.database).resolve()
        return (
            f"DATABASE_URL {location} names {path}, which is a damaged SQLite database ({reason})",
            f"restore {path} from a backup, or point DATABASE_URL at another database",
        )
    return (
        f"the database {location} cannot be used: {reason}",
        "check DATABASE_URL, and that the database server runs and accepts this user",
    )


def describe_database_error(database_url: str, error: DBAPIError) -> str:
    """Return one sentence saying what is wrong with the database and what to do, with no password."""
    problem, remedy = explain_database_error(database_url, error)
    return f"{problem}; {remedy}"


def _configure_sqlite(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL: in WAL mode a commit is written to the log but not synced to disk, so it survives a
    # crash of the process but not a power loss. The worker's bookkeeping commits this way, because
    # it can be redone: event ids are derived from the booking, so a sync repeated after a power
    # loss finds its own events. The receiver's commits, which acknowledge deliveries, are synced
    # (see `SqliteInserter` in connector/intake.py), and each sync also covers every earlier commit.
    cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Each pooled connection keeps its own page cache (2 MB by default), and in WAL mode it is
    # emptied at the start of every transaction after another connection wrote, which the
    # receiver does all the time. With 512 KB each, the peak RSS of `serve` after 100,000
    # deliveries fell from 150 to 136 MB (`python -m bench --only memory`, 2-core VM).
    cursor.execute("PRAGMA cache_size=-512")
    cursor.close()


def read_only(engine: Engine) -> Engine:
    """Return the engine for transactions that only read; on SQLite they take no write lock.

    In WAL mode a reader sees the last commit and never waits for the writer, so a read that
    took the write lock only made every writer, the receiver's inserts included, wait for it.
    """
    return engine.execution_options(**{SQLITE_READ_ONLY_OPTION: True})


def upsert_insert(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """Return an INSERT on `table` in the dialect's own form, which has `on_conflict_do_*` methods."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


def _begin_immediate(connection) -> None:
    # A deferred SQLite transaction that reads and then writes can fail at once with "database is
    # locked" when another writer committed in between; taking the write lock up front makes it
    # wait for the busy timeout instead. A transaction that only reads needs no lock.
    if connection.get_execution_options().get(SQLITE_READ_ONLY_OPTION):
        connection.exec_driver_sql("BEGIN")
        return
    connection.connection.driver_connection.begin_write()


def register_tables() -> None:
    """Import every module that declares tables, so `SQLModel.metadata` contains all of them."""
    import connector.calendars.ics_store  # noqa: F401  (the ics backend's tables)


def create_tables(engine: Engine) -> None:
    """Create any missing table."""
    register_tables()
    SQLModel.metadata.create_all(engine)
