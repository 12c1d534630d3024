"""Schema migrations on SQLite and PostgreSQL: upgrade, adoption of older databases, start-up checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, Table, Text, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from connector.schema import (
    SchemaError,
    SchemaOutOfDateError,
    alembic_config,
    check_schema,
    head_revision,
    prepare_schema,
    schema_status,
    upgrade_schema,
)
from connector.storage import make_engine, register_tables
from tests.support import SECRET, PostgresSchemas

EXECUTABLE = str(Path(sys.executable).with_name("proximity-sync"))
OUT_OF_DATE = "database schema is out of date: run `proximity-sync db upgrade`"
CONNECTOR_TABLES = {"deliveries", "booking_mappings", "booking_leases", "ics_events", "ics_feeds"}

register_tables()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    schemas: PostgresSchemas = request.getfixturevalue("postgres")
    return schemas.create()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=2)
    yield engine
    engine.dispose()


def schema_differences(engine: Engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, SQLModel.metadata)


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def run_cli(database_url: str, folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXIMITY_", "GOOGLE_"))}
    env.update({"DATABASE_URL": database_url, "PROXIMITY_WEBHOOK_SECRET": SECRET})
    return subprocess.run([EXECUTABLE, *arguments], cwd=folder, env=env, capture_output=True, text=True, timeout=60)


def test_upgrade_from_empty_matches_models(engine):
    upgrade_schema(engine)

    assert table_names(engine) == CONNECTOR_TABLES | {"alembic_version"}
    assert schema_status(engine).current == head_revision()
    assert schema_differences(engine) == []


def test_comparison_notices_missing_index(engine):
    upgrade_schema(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_deliveries_due"))

    differences = schema_differences(engine)

    assert [difference[0] for difference in differences] == ["add_index"]
    assert differences[0][1].name == "ix_deliveries_due"


def test_second_upgrade_changes_nothing(engine):
    first = upgrade_schema(engine)
    second = upgrade_schema(engine)

    assert first.current is None
    assert not first.is_current
    assert second.current == head_revision()
    assert second.is_current


def test_database_from_create_all_is_adopted(engine):
    SQLModel.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO booking_leases (booking_id, owner, expires_at) VALUES ('bkg_old', 'worker-old', CURRENT_TIMESTAMP)"
        ))

    upgrade_schema(engine)

    assert schema_status(engine).is_current
    assert schema_differences(engine) == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT owner FROM booking_leases")).scalars().all() == ["worker-old"]


def test_partial_old_database_gets_missing_tables(engine):
    register_tables()
    SQLModel.metadata.create_all(engine, tables=[SQLModel.metadata.tables["deliveries"]])

    upgrade_schema(engine)

    assert table_names(engine) == CONNECTOR_TABLES | {"alembic_version"}
    assert schema_differences(engine) == []


def test_downgrade_removes_every_table(engine):
    upgrade_schema(engine)

    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    assert table_names(engine) == {"alembic_version"}
    assert schema_status(engine).current is None


def test_check_rejects_empty_database(engine):
    with pytest.raises(SchemaOutOfDateError) as raised:
        check_schema(engine)

    assert str(raised.value).startswith(OUT_OF_DATE)


def test_check_rejects_unknown_revision(engine):
    upgrade_schema(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(SchemaError) as raised:
        check_schema(engine)

    assert not isinstance(raised.value, SchemaOutOfDateError)
    assert "revision 9999" in str(raised.value)
    assert "newer version" in str(raised.value)


def test_prepare_upgrades_sqlite_only(engine):
    if engine.dialect.name == "sqlite":
        prepare_schema(engine)
        assert schema_status(engine).is_current
    else:
        with pytest.raises(SchemaOutOfDateError):
            prepare_schema(engine)
        assert table_names(engine) == set()


def test_concurrent_upgrades_both_succeed(engine):
    results: list[object] = []

    def upgrade() -> None:
        try:
            results.append(upgrade_schema(engine))
        except Exception as error:
            results.append(error)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [type(result).__name__ for result in results] == ["SchemaStatus"] * 4
    assert sum(not result.is_current for result in results) == 1
    assert schema_status(engine).is_current


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("command_name", ["serve", "worker"])
def test_startup_rejects_out_of_date_postgres(postgres, tmp_path, command_name):
    url = postgres.create()

    result = run_cli(url, tmp_path, command_name)

    assert result.returncode == 1
    assert f"Error: {OUT_OF_DATE}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_db_commands_upgrade_postgres(postgres, tmp_path):
    url = postgres.create()

    before = run_cli(url, tmp_path, "db", "current")
    upgraded = run_cli(url, tmp_path, "db", "upgrade")
    again = run_cli(url, tmp_path, "db", "upgrade")
    after = run_cli(url, tmp_path, "db", "current")
    listing = run_cli(url, tmp_path, "deliveries")

    assert before.returncode == 1
    assert "revision none" in before.stdout
    assert "run `proximity-sync db upgrade`" in before.stdout
    assert upgraded.returncode == 0
    assert upgraded.stdout.strip() == f"Database schema upgraded from revision none to {head_revision()}."
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert after.returncode == 0
    assert listing.returncode == 0
    assert listing.stdout.strip() == "No deliveries match."


@pytest.mark.slow
def test_sqlite_commands_upgrade_themselves(tmp_path):
    database = tmp_path / "fresh.db"
    database.touch()
    url = f"sqlite:///{database}"

    listing = run_cli(url, tmp_path, "deliveries")
    current = run_cli(url, tmp_path, "db", "current")

    assert listing.returncode == 0
    assert listing.stdout.strip() == "No deliveries match."
    assert current.returncode == 0
    assert current.stdout.strip() == f"Database schema is at revision {head_revision()}, the newest."


@pytest.mark.slow
def test_unreachable_database_stops_worker(tmp_path):
    # Port 1 on loopback has no server, so the connection is refused at once.
    result = run_cli("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path, "worker")

    assert result.returncode == 1
    assert "Error: cannot reach the database postgresql+psycopg://postgres@127.0.0.1:1/test" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_upgrade_sql_renders_without_database(tmp_path):
    result = run_cli("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path, "db", "upgrade", "--sql")

    assert result.returncode == 0
    for table in sorted(CONNECTOR_TABLES):
        assert f"CREATE TABLE {table} (" in result.stdout
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in result.stdout
    assert "CREATE INDEX ix_deliveries_booking_due ON deliveries (booking_id, state, next_attempt_at)" in result.stdout
    assert f"UPDATE alembic_version SET version_num='{head_revision()}'" in result.stdout


def test_new_revision_writes_table_change(tmp_path, monkeypatch):
    from connector import schema

    versions = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS_DIR, versions, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", versions)
    schema._scripts.cache_clear()
    probe = Table(
        "probe_notes",
        SQLModel.metadata,
        Column("id", Integer, primary_key=True),
        Column("note", Text),
        Column("author", AutoString(length=80)),
        Column("written_at", UTCDateTime()),
    )
    try:
        path = schema.new_revision("add probe notes")
        script = path.read_text()
        head = schema.head_revision()
    finally:
        SQLModel.metadata.remove(probe)
        schema._scripts.cache_clear()

    assert path.name == "0003_add_probe_notes.py"
    assert head == "0003"
    assert "down_revision = '0002'" in script
    assert "op.create_table('probe_notes'" in script
    assert "op.drop_table('probe_notes')" in script
    assert "sa.Column('author', sa.String(length=80), nullable=True)" in script
    assert "sa.Column('written_at', sa.DateTime(timezone=True), nullable=True)" in script
    assert "sqlmodel" not in script


def test_booking_queries_use_booking_index(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("the query plans checked here are SQLite's")
    upgrade_schema(engine)
    queries = {
        "pending": "SELECT id FROM deliveries WHERE booking_id = 'b' AND state = 'pending' ORDER BY version",
        "due": "SELECT id FROM deliveries WHERE booking_id = 'b' AND state = 'pending' AND next_attempt_at <= '2026-12-05'",
        "retry": "SELECT min(next_attempt_at) FROM deliveries WHERE booking_id = 'b' AND state = 'pending' AND last_error IS NOT NULL",
    }

    with engine.connect() as connection:
        for name, query in queries.items():
            plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + query))
            assert "ix_deliveries_booking_due" in plan, (name, plan)
