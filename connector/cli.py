"""The `proximity-sync` command line."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
import shutil
import signal
import socket
import sys
import textwrap
import threading
from datetime import datetime
from typing import Any

import click
from sqlalchemy import and_, or_, select
from sqlmodel import Session

from connector.db_cli import db
from connector.envelope import parse_timestamp
from connector.logs import configure_logging
from connector.notify import notify_new_deliveries
from connector.operator.check import check
from connector.operator.common import build_command_connector, open_database
from connector.operator.progress import is_terminal, progress
from connector.operator.reconcile import reconcile
from connector.operator.send_test import send_test
from connector.queue import replay_delivery
from connector.retention import RetentionPolicy
from connector.retention import describe as describe_prune
from connector.retention import prune as run_prune
from connector.settings import Settings, SettingsError, load_settings, split_secrets
from connector.storage import BookingMapping, Delivery, DeliveryState

log = logging.getLogger(__name__)


def _settings(*, configure_logs: bool = True) -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    if configure_logs:
        configure_logging(settings.log_level, settings.log_format)
    return settings


def _engine(settings: Settings, *, must_exist: bool = False):
    """Open the database; with `must_exist`, refuse to create a new SQLite file for a read-only command."""
    if must_exist:
        _require_existing_sqlite_file(settings.database_url)
    return open_database(settings)


def _require_existing_sqlite_file(database_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    path = Path(url.database)
    if not path.exists():
        raise click.ClickException(
            f"no database at {path.resolve()}; run this command in the folder where the connector runs, "
            "or set DATABASE_URL to its database"
        )


@click.group()
@click.version_option(package_name="proximity-sync")
def main() -> None:
    """Mirror Proximity bookings into staff calendars.

    Settings are read from environment variables and from a .env file in the working folder.
    `proximity-sync settings` lists them with the values in use, and `proximity-sync check`
    tests them.
    """


@main.command("settings")
def list_settings() -> None:
    """List every setting: the value in use, its default, and what it sets. Secrets are not shown."""
    settings = _settings(configure_logs=False)  # prints no log lines, so the log settings need not apply
    for name, field in Settings.model_fields.items():
        value = _shown_setting(name, getattr(settings, name))
        default = _shown_setting(name, field.default)
        origin = "default" if value == default else f"default {default}"
        if name == "calendar_backend" and not settings.calendar_backend:
            value = f"not set, so {settings.backend_name} is used"
        click.echo(f"{name.upper()}: {value} ({origin})")
        click.echo(f"    {field.description}")


def _shown_setting(name: str, value: Any) -> str:
    """Return a setting's value as `settings` prints it: webhook secrets counted, a database password hidden."""
    if value is None or value == "":
        return "not set"
    if name == "proximity_webhook_secret":
        count = len(split_secrets(value))
        return f"{count} secret{'s' if count != 1 else ''}, not shown"
    if name == "database_url":
        from sqlalchemy.engine import make_url

        return make_url(value).render_as_string(hide_password=True)
    return str(value)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port to listen on (0: any free port).")
@click.option("--no-worker", is_flag=True, help="Only receive deliveries; separate `worker` processes sync them.")
def serve(host: str, port: int, no_worker: bool) -> None:
    """Run the webhook receiver, and the sync worker in the same process unless --no-worker is given."""
    import uvicorn

    from connector.app import build_web_app

    settings = _settings()
    connector = build_command_connector(settings, with_worker=not no_worker)
    try:
        listener = listen_socket(host, port)
    except click.ClickException:
        connector.close()
        raise
    port = listener.getsockname()[1]
    base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    _announce(settings, connector, base_url)
    app = build_web_app(connector)

    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again with the
    # handlers that were installed before it started; these make that second delivery a no-op,
    # so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    # With no log_config, uvicorn adds no handlers of its own: its loggers propagate to the root
    # handler that configure_logging installed, so its lines follow LOG_FORMAT too.
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=False, log_config=None)
    server = uvicorn.Server(config)
    # uvicorn logs no start line for a socket passed in, so this line takes the place of its own.
    log.info("Listening on %s (press Ctrl+C to stop)", base_url)
    server.run(sockets=[listener])
    if not server.started:
        raise click.ClickException("the web server stopped before it started serving; the log lines above say why")


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on `host`:`port` before the worker starts, or raise a ClickException naming them.

    The options match uvicorn's own binding (`Config.bind_socket` in uvicorn 0.55): SO_REUSEADDR,
    and IPv6 when the host contains a colon. Listening at once claims the port, and uvicorn sets
    its own backlog when it starts serving.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen()
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"cannot listen on {address} because another process already uses that address; "
                "stop that process, or choose another port with --port"
            ) from None
        raise click.ClickException(
            f"cannot listen on {address}: {error.strerror or error}; choose another address with --host or port with --port"
        ) from None
    return listener


def _announce(settings: Settings, connector, base_url: str) -> None:
    backend = connector.backend.name
    if backend == "ics" and settings.calendar_backend is None:
        _say(settings, "Calendar backend: ics (no GOOGLE_CREDENTIALS_FILE set); events are served as iCalendar feeds.")
    else:
        _say(settings, f"Calendar backend: {backend}")
    if not settings.webhook_secrets:
        _say(settings, "PROXIMITY_WEBHOOK_SECRET is not set, so every delivery is rejected with 401.", level=logging.WARNING)
    _say(settings, f"Webhook URL: {settings.public_url or base_url}/webhooks/proximity")

    if backend == "ics":
        from connector.calendars.ics import feed_url

        for calendar_id, token in connector.backend.feeds():
            _say(settings, f"Feed for {calendar_id}: {feed_url(settings.public_url or base_url, token)}")


def _say(settings: Settings, message: str, *, level: int = logging.INFO, err: bool = False) -> None:
    """Print a message of `serve` or `worker`, or log it with LOG_FORMAT=json so that every line is JSON.

    In text format the message goes to standard output (standard error with `err`), and a
    WARNING gets a `Warning: ` prefix. In JSON format LOG_LEVEL applies to it like to any log line.
    """
    if settings.log_format == "json":
        log.log(level, message)
        return
    prefix = "Warning: " if level == logging.WARNING else ""
    click.echo(prefix + message, err=err)


@main.command()
def worker() -> None:
    """Run the sync worker alone, for deployments that run receivers separately."""
    settings = _settings()
    connector = build_command_connector(settings, with_worker=True)
    stopped = threading.Event()

    def request_stop(signum, _frame) -> None:
        name = signal.Signals(signum).name
        _say(settings, f"Received {name}: finishing the calendar calls in flight, then releasing their bookings.", err=True)
        stopped.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    connector.worker.start()
    stopped.wait()
    connector.close()


@main.command()
@click.option("--state", type=click.Choice(DeliveryState.ALL), help="Only deliveries in this state.")
@click.option("--booking", "booking_id", help="Only deliveries of this booking id.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="Show at most this many deliveries, newest first (at least 1).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def deliveries(state: str | None, booking_id: str | None, limit: int, as_json: bool) -> None:
    """List stored deliveries: state, failed attempts, next attempt, and the last error or outcome."""
    engine = _engine(_settings(), must_exist=True)
    query = (
        select(Delivery, BookingMapping.calendar_id, BookingMapping.event_id)
        .outerjoin(BookingMapping, BookingMapping.booking_id == Delivery.booking_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
    if booking_id:
        query = query.where(Delivery.booking_id == booking_id)
    with Session(engine) as session:
        rows = [
            {**_delivery_row(delivery), "calendar": calendar_id, "calendar_event": event_id}
            for delivery, calendar_id, event_id in session.execute(query)
        ]

    if as_json:
        _echo_json(rows)
    elif not rows:
        click.echo("No deliveries match.")
    else:
        _print_rows(rows, ["delivery", "booking", "event", "state", "attempts", "received", "next_attempt"])


def _delivery_row(delivery: Delivery) -> dict[str, Any]:
    return {
        "delivery": delivery.delivery_id,
        "booking": delivery.booking_id,
        "event": delivery.event,
        "version": delivery.version,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "received": _iso(delivery.received_at),
        "next_attempt": _iso(delivery.next_attempt_at) if delivery.state == DeliveryState.PENDING else None,
        "finished": _iso(delivery.finished_at),
        "last_error": delivery.last_error,
        "outcome": delivery.outcome,
        "payload_pruned": delivery.body is None,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _echo_json(document: object) -> None:
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))


# Table headers that differ from their JSON key. `attempts` counts the attempts that failed, so a
# delivery applied at its first attempt shows 0.
_COLUMN_HEADERS = {"attempts": "failed attempts"}


def _print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print one line of columns per delivery, and under it its last error or outcome, wrapped to the terminal."""
    width = max(shutil.get_terminal_size((120, 24)).columns, 60)
    headers = {column: _COLUMN_HEADERS.get(column, column).upper().replace("_", " ") for column in columns}
    widths = {column: max(len(headers[column]), *(len(_cell(row.get(column))) for row in rows)) for column in columns}
    click.echo("  ".join(headers[column].ljust(widths[column]) for column in columns).rstrip())
    for row in rows:
        click.echo("  ".join(_cell(row.get(column)).ljust(widths[column]) for column in columns).rstrip())
        label, detail = _detail(row)
        if detail:
            lines = textwrap.wrap(
                detail, width=width, initial_indent=f"    {label}: ", subsequent_indent=" " * (len(label) + 6),
                break_on_hyphens=False,
            )
            click.echo("\n".join(lines))


def _detail(row: dict[str, Any]) -> tuple[str, str | None]:
    """Return the line worth showing under a delivery: its error while unresolved, else its outcome."""
    if row["state"] in (DeliveryState.FAILED, DeliveryState.PENDING) and row.get("last_error"):
        return "error", row["last_error"]
    return "outcome", row.get("outcome")


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


@main.command()
@click.argument("delivery_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Replay every failed delivery (narrowed by --booking and --since).")
@click.option("--booking", "booking_id", help="With --failed: only this booking's deliveries.")
@click.option("--since", help="With --failed: only deliveries that failed at or after this ISO 8601 time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def replay(delivery_ids: tuple[str, ...], failed: bool, booking_id: str | None, since: str | None, as_json: bool) -> None:
    """Queue deliveries again, by id or every failed one.

    A delivery whose snapshot is already applied, or older than the applied one, is left as it
    is, because applying it would change nothing. A pending delivery becomes due at once.
    """
    if not delivery_ids and not failed:
        raise click.UsageError("name delivery ids, or use --failed")
    if (booking_id or since) and not failed:
        raise click.UsageError("--booking and --since only narrow --failed")
    failed_since = None
    if since is not None:
        failed_since = parse_timestamp(since)
        if failed_since is None:
            raise click.BadParameter(f"{since!r} is not an ISO 8601 time, such as 2026-03-16T14:00:00Z", param_hint="--since")

    engine = _engine(_settings(), must_exist=True)
    conditions = []
    if delivery_ids:
        conditions.append(Delivery.delivery_id.in_(delivery_ids))
    if failed:
        chosen = [Delivery.state == DeliveryState.FAILED]
        if booking_id:
            chosen.append(Delivery.booking_id == booking_id)
        if failed_since is not None:
            chosen.append(Delivery.finished_at >= failed_since)
        conditions.append(and_(*chosen))

    with Session(engine) as session:
        found = session.execute(select(Delivery).where(or_(*conditions)).order_by(Delivery.id)).scalars().all()
        with progress(found, "Replaying deliveries", length=len(found), enabled=not as_json) as deliveries_to_replay:
            results = [replay_delivery(session, delivery) for delivery in deliveries_to_replay]
        if any(result.queued for result in results):
            notify_new_deliveries(session.connection())
        session.commit()

    missing = sorted(set(delivery_ids) - {result.delivery_id for result in results})
    if as_json:
        rows = [{"delivery": result.delivery_id, "queued": result.queued, "message": result.message} for result in results]
        rows += [{"delivery": delivery_id, "queued": False, "message": "no delivery with this id"} for delivery_id in missing]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        if missing:
            sys.exit(1)
        return

    for delivery_id in missing:
        click.echo(f"No delivery with id {delivery_id}.", err=True)
    width = max((len(result.delivery_id) for result in results), default=0)
    for result in results:
        click.echo(f"{result.delivery_id.ljust(width)}  {result.message}")

    queued = sum(result.queued for result in results)
    if failed and not results and not delivery_ids:
        click.echo("No failed deliveries match.")
    else:
        click.echo(f"Queued {queued} of {len(results) + len(missing)} deliveries.")
    if missing:
        sys.exit(1)


class PruneCounter:
    """Shows on a terminal how many rows a prune has changed so far; prints nothing elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.enabled:
            click.echo(f"\rPruning: {self.rows} rows changed", nl=False, err=True)

    def finish(self) -> None:
        if self.enabled and self.rows:
            click.echo(err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a sentence.")
def prune(as_json: bool) -> None:
    """Clear old payloads and delete old delivery records, as the worker does every PRUNE_INTERVAL_SECONDS.

    Pending and failed deliveries are kept, and so is the newest payload of each booking whose
    event is live, until the booking is over.
    """
    settings = _settings()
    engine = _engine(settings, must_exist=True)
    policy = RetentionPolicy(settings.payload_retention_days, settings.delivery_retention_days)
    counter = PruneCounter(enabled=not as_json and is_terminal())
    report = run_prune(engine, policy, on_batch=counter.add)
    counter.finish()
    if as_json:
        _echo_json({
            "payloads_cleared": report.payloads_cleared,
            "deliveries_deleted": report.deliveries_deleted,
            "snapshots_kept": report.snapshots_kept,
            "payload_cutoff": _iso(report.payload_cutoff),
            "delivery_cutoff": _iso(report.delivery_cutoff),
        })
        return
    click.echo(f"Pruned: {describe_prune(report)}.")


@main.command()
@click.argument("booking_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def booking(booking_id: str, as_json: bool) -> None:
    """Show a booking's calendar event and the deliveries applied to it."""
    engine = _engine(_settings(), must_exist=True)
    with Session(engine) as session:
        mapping = session.get(BookingMapping, booking_id)
        rows = [
            _delivery_row(delivery)
            for delivery in session.execute(
                select(Delivery).where(Delivery.booking_id == booking_id).order_by(Delivery.version, Delivery.id)
            ).scalars()
        ]
    if mapping is None and not rows:
        raise click.ClickException(f"no booking {booking_id} is known")

    event = None
    if mapping is not None:
        event = {
            "state": mapping.state,
            "calendar": mapping.calendar_id,
            "event_id": mapping.event_id,
            "generation": mapping.generation,
            "version": mapping.version,
            "carried_to": mapping.carried_to,
            "updated": _iso(mapping.updated_at),
        }
    if as_json:
        _echo_json({"booking": booking_id, "event": event, "deliveries": rows})
        return

    click.echo(f"Booking {booking_id}")
    if event is None:
        click.echo("  No calendar event recorded.")
    else:
        for key, value in event.items():
            if value is not None:
                click.echo(f"  {key}: {value}")
    click.echo("Deliveries:")
    if rows:
        _print_rows(rows, ["delivery", "event", "version", "state", "attempts"])


main.add_command(db)
main.add_command(check)
main.add_command(send_test)
main.add_command(reconcile)


@main.command()
@click.option("--base-url", help="Base URL the connector is reached at; default PUBLIC_URL, else http://127.0.0.1:8000.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def feeds(base_url: str | None, as_json: bool) -> None:
    """List the iCalendar feed URL of every calendar the embedded backend has written."""
    from connector.calendars.ics import IcsCalendar, feed_url

    settings = _settings()
    engine = _engine(settings, must_exist=True)
    base = base_url or settings.public_url or "http://127.0.0.1:8000"
    rows = [
        {"calendar": calendar_id, "url": feed_url(base, token)}
        for calendar_id, token in IcsCalendar(engine).feeds()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return

    if not rows:
        click.echo("No feeds yet: a calendar's feed is created with its first event.")
    for row in rows:
        click.echo(f"{row['calendar']}: {row['url']}")


if __name__ == "__main__":
    main()
