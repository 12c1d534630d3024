"""Alembic environment: runs migrations on the connection that `connector.schema` passes in.

Alembic executes this file for every command. `connector.schema` opens the transaction,
takes the migration lock, and puts the connection in `config.attributes["connection"]`.
Offline mode (`proximity-sync db upgrade --sql`) renders the SQL for the configured URL instead.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from connector.storage import register_tables

register_tables()

config = context.config
target_metadata = SQLModel.metadata


def render_item(kind: str, item: object, _autogen_context) -> str | bool:
    """Render SQLModel's column types as plain SQLAlchemy ones, so migrations need no sqlmodel import."""
    if kind == "type" and isinstance(item, AutoString):
        return f"sa.String(length={item.length})" if item.length else "sa.String()"
    if kind == "type" and isinstance(item, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    """Write the migration SQL to standard output instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, inside the caller's transaction."""
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=render_item,
        # SQLite cannot alter most column properties in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
