"""Settings and database access shared by the operator commands."""

from __future__ import annotations

import click
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from connector.logs import configure_logging
from connector.schema import SchemaError, prepare_schema
from connector.settings import Settings, SettingsError, load_settings
from connector.storage import describe_database_error, make_engine


def command_settings() -> Settings:
    """Load the settings and set up logging, or stop the command with the settings error.

    These commands print their own report, so their log shows warnings and errors only, unless
    LOG_LEVEL is DEBUG.
    """
    try:
        settings = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    configure_logging(level, settings.log_format)
    return settings


def build_command_connector(settings: Settings, with_worker: bool):
    """Build the connector for a command, or stop the command with one sentence naming what is wrong."""
    from connector.app import build_connector
    from connector.calendars.google_auth import CredentialsFileError
    from connector.mappings import MappingsError

    try:
        return build_connector(settings, with_worker=with_worker)
    except MappingsError as error:
        raise click.ClickException(f"invalid mappings file: {error}") from None
    except CredentialsFileError as error:
        raise click.ClickException(f"GOOGLE_CREDENTIALS_FILE: {error}") from None
    except SchemaError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        raise click.ClickException(describe_database_error(settings.database_url, error)) from None


def open_database(settings: Settings) -> Engine:
    """Open the connector's database with its schema ready, or stop the command with the reason."""
    engine = make_engine(settings.database_url, pool_size=2)
    try:
        prepare_schema(engine)
    except SchemaError as error:
        engine.dispose()
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        engine.dispose()
        raise click.ClickException(describe_database_error(settings.database_url, error)) from None
    return engine
