"""The `proximity-sync db` commands: apply the schema migrations and show the schema revision."""

from __future__ import annotations

import sys

import click
from sqlalchemy.exc import DBAPIError

from connector.logs import configure_logging
from connector.schema import SchemaError, render_upgrade_sql, schema_status, upgrade_schema
from connector.settings import Settings, SettingsError, load_settings
from connector.storage import describe_database_error, make_engine


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    configure_logging(settings.log_level)
    return settings


@click.group()
def db() -> None:
    """Manage the database schema (the tables behind DATABASE_URL)."""


@db.command()
@click.option("--sql", "as_sql", is_flag=True, help="Print the SQL of every migration instead of applying it.")
def upgrade(as_sql: bool) -> None:
    """Apply the migrations the database lacks; run it before starting a new version.

    Safe to run again, and from several hosts at once: a second run finds nothing to do.
    """
    settings = _settings()
    if as_sql:
        render_upgrade_sql(settings.database_url, sys.stdout)
        return

    engine = make_engine(settings.database_url, pool_size=1)
    try:
        status = upgrade_schema(engine)
    except SchemaError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        raise click.ClickException(describe_database_error(settings.database_url, error)) from None
    finally:
        engine.dispose()

    if status.is_current:
        click.echo(f"Database schema is already at revision {status.head}; nothing to do.")
    else:
        click.echo(f"Database schema upgraded from revision {status.current or 'none'} to {status.head}.")


@db.command()
def current() -> None:
    """Print the database's schema revision; exit 1 when it is out of date."""
    settings = _settings()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        status = schema_status(engine)
    except SchemaError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        raise click.ClickException(describe_database_error(settings.database_url, error)) from None
    finally:
        engine.dispose()

    if status.is_current:
        click.echo(f"Database schema is at revision {status.head}, the newest.")
        return
    click.echo(
        f"Database schema is at revision {status.current or 'none'}, but this version needs {status.head}: "
        "run `proximity-sync db upgrade`."
    )
    sys.exit(1)
