"""The `proximity-sync` command line."""

from __future__ import annotations

import json
import signal
import sys
import threading
from datetime import datetime
from typing import Any

import click
from sqlalchemy import or_, select, update
from sqlmodel import Session

from connector.envelope import parse_timestamp
from connector.logs import configure_logging
from connector.mappings import MappingsError
from connector.settings import Settings, SettingsError, load_settings
from connector.storage import BookingMapping, Delivery, DeliveryState, create_tables, make_engine, utcnow


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    configure_logging(settings.log_level)
    return settings


def _connector(settings: Settings, with_worker: bool):
    from connector.app import build_connector
    from connector.calendars.google_auth import CredentialsFileError

    try:
        return build_connector(settings, with_worker=with_worker)
    except MappingsError as error:
        raise click.ClickException(f"invalid mappings file: {error}") from None
    except CredentialsFileError as error:
        raise click.ClickException(f"GOOGLE_CREDENTIALS_FILE: {error}") from None


def _engine(settings: Settings):
    engine = make_engine(settings.database_url, pool_size=2)
    create_tables(engine)
    return engine


@click.group()
@click.version_option(package_name="proximity-sync")
def main() -> None:
    """Mirror Proximity bookings into staff calendars."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port to listen on.")
def serve(host: str, port: int) -> None:
    """Run the webhook receiver and the sync worker in one process."""
    import uvicorn

    from connector.app import build_web_app

    settings = _settings()
    connector = _connector(settings, with_worker=True)
    _announce(settings, connector, f"http://{host}:{port}")
    app = build_web_app(connector)

    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again with the
    # handlers that were installed before it started; these make that second delivery a no-op,
    # so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), access_log=False)


def _announce(settings: Settings, connector, base_url: str) -> None:
    backend = connector.backend.name
    if backend == "ics" and settings.calendar_backend is None:
        click.echo("Calendar backend: ics (no GOOGLE_CREDENTIALS_FILE set); events are served as iCalendar feeds.")
    else:
        click.echo(f"Calendar backend: {backend}")
    if not settings.webhook_secrets:
        click.echo("Warning: PROXIMITY_WEBHOOK_SECRET is not set, so every delivery is rejected with 401.")
    click.echo(f"Webhook URL: {settings.public_url or base_url}/webhooks/proximity")

    if backend == "ics":
        from connector.calendars.ics import feed_url

        for calendar_id, token in connector.backend.feeds():
            click.echo(f"Feed for {calendar_id}: {feed_url(settings.public_url or base_url, token)}")


@main.command()
def worker() -> None:
    """Run the sync worker alone, for deployments that run receivers separately."""
    settings = _settings()
    connector = _connector(settings, with_worker=True)
    stopped = threading.Event()

    def request_stop(signum, _frame) -> None:
        click.echo(f"Received signal {signum}; finishing the bookings in flight.", err=True)
        stopped.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    connector.worker.start()
    stopped.wait()
    connector.close()


@main.command()
@click.option("--state", type=click.Choice(DeliveryState.ALL), help="Only deliveries in this state.")
@click.option("--booking", "booking_id", help="Only deliveries of this booking id.")
@click.option("--limit", default=100, show_default=True, help="Show at most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def deliveries(state: str | None, booking_id: str | None, limit: int, as_json: bool) -> None:
    """List stored deliveries with their state, attempts and last error."""
    engine = _engine(_settings())
    query = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if state:
        query = query.where(Delivery.state == state)
    if booking_id:
        query = query.where(Delivery.booking_id == booking_id)
    with Session(engine) as session:
        rows = [_delivery_row(delivery) for delivery in session.execute(query).scalars()]
    _print_rows(rows, as_json, ["delivery", "booking", "event", "state", "attempts", "received", "next_attempt", "detail"])


def _delivery_row(delivery: Delivery) -> dict[str, Any]:
    detail = delivery.last_error if delivery.state in (DeliveryState.FAILED, DeliveryState.PENDING) else delivery.outcome
    return {
        "delivery": delivery.delivery_id,
        "booking": delivery.booking_id,
        "event": delivery.event,
        "version": delivery.version,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "received": _iso(delivery.received_at),
        "next_attempt": _iso(delivery.next_attempt_at) if delivery.state == DeliveryState.PENDING else None,
        "detail": detail,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo("No deliveries match.")
        return
    widths = {column: max(len(column), *(len(_cell(row.get(column))) for row in rows)) for column in columns[:-1]}
    click.echo("  ".join(column.upper().ljust(widths[column]) for column in columns[:-1]) + "  " + columns[-1].upper())
    for row in rows:
        cells = [_cell(row.get(column)).ljust(widths[column]) for column in columns[:-1]]
        click.echo("  ".join(cells) + "  " + _cell(row.get(columns[-1])))


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


@main.command()
@click.argument("delivery_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Replay every failed delivery (narrowed by --booking, --since).")
@click.option("--booking", "booking_id", help="With --failed: only this booking's deliveries.")
@click.option("--since", help="With --failed: only deliveries received at or after this ISO 8601 time.")
def replay(delivery_ids: tuple[str, ...], failed: bool, booking_id: str | None, since: str | None) -> None:
    """Queue deliveries again; an already-applied snapshot changes nothing."""
    if not delivery_ids and not failed:
        raise click.UsageError("name delivery ids, or use --failed")
    if (booking_id or since) and not failed:
        raise click.UsageError("--booking and --since only narrow --failed")

    engine = _engine(_settings())
    conditions = []
    if delivery_ids:
        conditions.append(Delivery.delivery_id.in_(delivery_ids))
    if failed:
        failed_condition = [Delivery.state == DeliveryState.FAILED]
        if booking_id:
            failed_condition.append(Delivery.booking_id == booking_id)
        if since:
            moment = parse_timestamp(since)
            if moment is None:
                raise click.BadParameter(f"{since!r} is not an ISO 8601 time", param_hint="--since")
            failed_condition.append(Delivery.received_at >= moment)
        from sqlalchemy import and_

        conditions.append(and_(*failed_condition))

    with engine.begin() as connection:
        found = connection.execute(select(Delivery.delivery_id, Delivery.booking_id).where(or_(*conditions))).all()
        connection.execute(
            update(Delivery)
            .where(or_(*conditions), Delivery.booking_id.is_not(None))
            .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow(), last_error=None, finished_at=None)
        )

    missing = set(delivery_ids) - {delivery_id for delivery_id, _ in found}
    for delivery_id in sorted(missing):
        click.echo(f"No delivery with id {delivery_id}.", err=True)
    queued = [delivery_id for delivery_id, booking in found if booking]
    click.echo(f"Queued {len(queued)} deliveries again.")
    if missing:
        sys.exit(1)


@main.command()
@click.argument("booking_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def booking(booking_id: str, as_json: bool) -> None:
    """Show a booking's calendar event and the deliveries applied to it."""
    engine = _engine(_settings())
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
        click.echo(json.dumps({"booking": booking_id, "event": event, "deliveries": rows}, indent=2, ensure_ascii=False))
        return

    click.echo(f"Booking {booking_id}")
    if event is None:
        click.echo("  No calendar event recorded.")
    else:
        for key, value in event.items():
            if value is not None:
                click.echo(f"  {key}: {value}")
    click.echo("Deliveries:")
    _print_rows(rows, False, ["delivery", "event", "version", "state", "attempts", "detail"])


if __name__ == "__main__":
    main()
