"""Database schema versions: applying the Alembic migrations and checking that they are applied.

The migrations live in `connector/migrations`, inside the package, so an installed connector
can upgrade its own database. Alembic is configured here in code rather than by an alembic.ini.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from connector.storage import make_engine, parse_database_url

log = logging.getLogger(__name__)

# Alembic logs its set-up at INFO on every schema check; this module logs the upgrades itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
UPGRADE_COMMAND = "proximity-sync db upgrade"

# Key of the PostgreSQL advisory lock that serializes concurrent upgrades of one database.
# Any constant works, as long as every connector version uses the same one.
MIGRATION_LOCK_KEY = 7_032_175_891


class SchemaError(Exception):
    """The database schema cannot be used or changed; the message names the fix."""


class SchemaOutOfDateError(SchemaError):
    """The database lacks migrations that this version of the connector needs."""


@dataclass(frozen=True)
class SchemaStatus:
    """The database's migration revision next to the newest one this version ships."""

    current: str | None
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head


def alembic_config(database_url: str | None = None, output: TextIO | None = None) -> Config:
    """Build the Alembic configuration for the packaged migrations."""
    config = Config(output_buffer=output or sys.stdout)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic reads main options with ConfigParser interpolation, so a literal % is written %%.
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """Return the newest migration revision shipped with this version."""
    head = _scripts().get_current_head()
    if head is None:
        raise SchemaError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def schema_status(engine: Engine) -> SchemaStatus:
    """Read the database's revision; raise SchemaError when the database cannot be reached."""
    with _connect(engine) as connection:
        current = _current_revision(connection)
    return SchemaStatus(current=current, head=head_revision())


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDateError unless the database is at the newest revision."""
    status = schema_status(engine)
    if status.is_current:
        return

    _reject_unknown_revision(status.current)
    raise SchemaOutOfDateError(
        f"database schema is out of date: run `{UPGRADE_COMMAND}` "
        f"(the database is at revision {status.current or 'none'}, this version needs {status.head})"
    )


def upgrade_schema(engine: Engine) -> SchemaStatus:
    """Apply every missing migration in one transaction; return the revisions before and after.

    Concurrent upgrades of one database run one after the other, so the later ones find nothing
    to do. PostgreSQL serializes them with an advisory lock, SQLite with `BEGIN IMMEDIATE`.
    """
    head = head_revision()
    with _connect(engine) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        before = _current_revision(connection)
        if before == head:
            return SchemaStatus(current=before, head=head)

        _reject_unknown_revision(before)
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    log.info("database schema upgraded from revision %s to %s", before or "none", head)
    return SchemaStatus(current=before, head=head)


def prepare_schema(engine: Engine) -> None:
    """Make sure the schema is usable before the connector starts.

    SQLite, the embedded default, is upgraded in place. A PostgreSQL database is shared by many
    processes, so only `proximity-sync db upgrade` changes it, and an out-of-date schema raises
    SchemaOutOfDateError.
    """
    if engine.dialect.name == "sqlite":
        upgrade_schema(engine)
    else:
        check_schema(engine)


def render_upgrade_sql(database_url: str, output: TextIO) -> None:
    """Write the SQL of every migration to `output`, for a database administrator to apply."""
    url = parse_database_url(database_url).render_as_string(hide_password=False)
    command.upgrade(alembic_config(url, output), "head", sql=True)


def new_revision(message: str) -> Path:
    """Write a new migration script from the difference between the tables and the migrations.

    For developers: it upgrades a scratch SQLite database to the newest revision, compares it
    with `SQLModel.metadata`, and writes the script under `connector/migrations/versions`.
    Review the script before committing it, because autogenerate misses some changes
    (renames, server defaults).
    """
    number = len(list(_scripts().walk_revisions())) + 1
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'scratch.db'}", pool_size=1)
        try:
            upgrade_schema(engine)
            with engine.begin() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                script = command.revision(config, message, autogenerate=True, rev_id=f"{number:04d}")
        finally:
            engine.dispose()
    _scripts.cache_clear()
    return Path(script.path)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _reject_unknown_revision(revision: str | None) -> None:
    """Raise SchemaError when a newer connector has migrated the database past this version."""
    if revision is None:
        return
    try:
        _scripts().get_revision(revision)
    except CommandError:
        raise SchemaError(
            f"database schema is at revision {revision}, which this version of proximity-sync does not know: "
            "a newer version migrated it, so run that version or a later one"
        ) from None


def _connect(engine: Engine) -> Connection:
    """Open a connection, turning a failure into a SchemaError that names the database."""
    try:
        return engine.connect()
    except OperationalError as error:
        location = engine.url.render_as_string(hide_password=True)
        raise SchemaError(f"cannot reach the database {location}: {error.orig}") from None
