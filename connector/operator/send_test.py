"""`proximity-sync send-test`: send a signed sample delivery to a running connector.

It lets an operator try the whole path (signature, storage, routing, calendar write) before
Proximity is pointed at the connector. The delivery is signed with the first secret of
PROXIMITY_WEBHOOK_SECRET, so send-test must run with the connector's settings.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import httpx
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from connector.calendars.base import CalendarBackend, CalendarError, Target
from connector.envelope import BOOKING_EVENTS
from connector.operator.common import command_settings, open_database
from connector.queue import format_attempts
from connector.receiver import WEBHOOK_PATH
from connector.settings import Settings
from connector.signatures import sign
from connector.storage import BookingMapping, Delivery, DeliveryState

# The webhook URL of `proximity-sync serve` on its default host and port, used when PUBLIC_URL is not set.
DEFAULT_URL = f"http://127.0.0.1:8000{WEBHOOK_PATH}"

# Seconds between two reads of the database while waiting for the worker.
POLL_SECONDS = 0.2

# The sample booking of Proximity's webhook documentation. send-test moves its times to the next
# day (see `_sample_booking`), so the test event shows up in the calendar's coming days.
SAMPLE_BOOKING: dict[str, Any] = {
    "id": "bkg_xyz789",
    "eventTypeId": "evt_abc123",
    "eventTypeName": "30 Minute Call",
    "eventTypeSlug": "30min-call",
    "status": "Confirmed",
    "startTime": "2026-03-16T14:00:00Z",
    "endTime": "2026-03-16T14:30:00Z",
    "hostUserId": "usr_host123",
    "hostName": "Jane Doe",
    "hostEmail": "jane@example.com",
    "invitee": {
        "name": "Alex Johnson",
        "email": "alex@example.com",
        "phone": "+1-555-0123",
        "timezone": "America/New_York",
        "locale": "en",
        "notes": "Looking forward to it",
    },
    "location": {"type": "GoogleMeet", "value": "https://meet.google.com/abc-defg-hij"},
    "customFields": {"company": "Acme Inc.", "role": "Engineering Manager"},
    "source": "BookingPage",
    "createdAt": "2026-03-16T14:05:00Z",
    "cancelledAt": None,
    "cancellationReason": None,
    "rescheduledFrom": None,
}
SAMPLE_START_HOUR_UTC = 14
SAMPLE_LENGTH = timedelta(minutes=30)


@click.command("send-test")
@click.option(
    "--url",
    help=f"Webhook URL of the running connector. Default: PUBLIC_URL followed by {WEBHOOK_PATH} when PUBLIC_URL is set, else {DEFAULT_URL}.",
)
@click.option(
    "--event",
    "event_name",
    type=click.Choice(BOOKING_EVENTS),
    help="Event type to send; default booking.created, or the event of an envelope given with --booking.",
)
@click.option(
    "--booking",
    "booking_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file with a booking payload, or a whole envelope, to send instead of the sample booking.",
)
@click.option("--host", "host_email", metavar="EMAIL", help="Set the booking's hostEmail, so it goes to this host's calendar.")
@click.option("--wait", is_flag=True, help="Wait until the worker has applied the delivery, and print the calendar event.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait for the response, and with --wait for the worker.")
def send_test(
    url: str | None,
    event_name: str | None,
    booking_file: Path | None,
    host_email: str | None,
    wait: bool,
    timeout: float,
) -> None:
    """Send a correctly signed sample delivery to a running connector and print the response.

    The sample booking keeps its id, so sending `--event booking.cancelled` afterwards removes
    the test event again. Without --url it sends to the webhook path under PUBLIC_URL when that
    is set, and to port 8000 on 127.0.0.1 otherwise. Pass --url when `serve` runs elsewhere.
    """
    settings = command_settings()
    if url is None:
        url = f"{settings.public_url}{WEBHOOK_PATH}" if settings.public_url else DEFAULT_URL
    if not settings.webhook_secrets:
        raise click.ClickException(
            "PROXIMITY_WEBHOOK_SECRET is empty: set it to the connector's secret, which signs the test delivery"
        )

    now = datetime.now(UTC)
    event_name, payload = _booking(booking_file, event_name, now)
    if host_email:
        payload["hostEmail"] = host_email

    delivery_id = f"test_{uuid.uuid4().hex[:16]}"
    created_at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = json.dumps({"event": event_name, "createdAt": created_at, "payload": payload}, ensure_ascii=False).encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Event": event_name,
        "X-Webhook-Delivery": delivery_id,
        "X-Webhook-Signature": sign(body, settings.webhook_secrets[0]),
    }

    response = _post(url, body, headers, timeout)
    click.echo(f"Sent {event_name} for booking {payload['id']} as delivery {delivery_id} to {url}")
    click.echo(f"Response: {response.status_code} {response.reason_phrase}: {_response_text(response)}")
    if not response.is_success:
        click.echo(_rejection_hint(response.status_code, _response_text(response)), err=True)
        sys.exit(1)

    if wait:
        sys.exit(_wait_for_event(settings, delivery_id, timeout))


def _booking(booking_file: Path | None, event_name: str | None, now: datetime) -> tuple[str, dict[str, Any]]:
    """Return the event type and payload to send: the sample booking made at `now`, or the file's booking."""
    if booking_file is None:
        return event_name or "booking.created", _sample_booking(now)

    try:
        document = json.loads(booking_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"{booking_file} cannot be read: {error}", param_hint="--booking") from None
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"{booking_file} is not valid JSON ({error.msg} at line {error.lineno})", param_hint="--booking") from None

    if isinstance(document, dict) and isinstance(document.get("payload"), dict):
        file_event = document.get("event")
        event_name = event_name or (file_event if isinstance(file_event, str) else None)
        document = document["payload"]
    if not isinstance(document, dict):
        raise click.BadParameter(f"{booking_file} must contain a JSON object: a booking payload or an envelope", param_hint="--booking")
    if not isinstance(document.get("id"), str) or not document["id"].strip():
        raise click.BadParameter(f"{booking_file}: the booking has no id", param_hint="--booking")
    return event_name or "booking.created", document


def _sample_booking(now: datetime) -> dict[str, Any]:
    """Return the sample booking, created at `now` and lasting 30 minutes from 14:00 UTC the next day."""
    booking = copy.deepcopy(SAMPLE_BOOKING)
    day = now.astimezone(UTC).date() + timedelta(days=1)
    start = datetime(day.year, day.month, day.day, SAMPLE_START_HOUR_UTC, tzinfo=UTC)
    booking["startTime"] = _utc_text(start)
    booking["endTime"] = _utc_text(start + SAMPLE_LENGTH)
    booking["createdAt"] = _utc_text(now)
    return booking


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> httpx.Response:
    try:
        with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as client:
            return client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        raise click.ClickException(f"{url} timed out: no response within {timeout:g} s") from None
    except httpx.HTTPError as error:
        raise click.ClickException(
            f"could not send to {url}: {error}. Is the connector running (`proximity-sync serve`)? "
            "Pass its webhook URL with --url"
        ) from None


def _response_text(response: httpx.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        return response.text.strip() or "(empty body)"
    if isinstance(document, dict):
        return str(document.get("status") or document.get("error") or document)
    return str(document)


def _rejection_hint(status: int, reason: str) -> str:
    if status == 401 and reason.startswith("no webhook secret is configured"):
        return (
            "The connector has no webhook secret, so it rejects every delivery. Set its "
            "PROXIMITY_WEBHOOK_SECRET, in its environment or its .env file, to the one send-test used, "
            "then restart it."
        )
    if status == 401:
        return (
            "The connector rejected the signature: its PROXIMITY_WEBHOOK_SECRET differs from the one "
            "send-test used. Run send-test with the connector's settings."
        )
    if status == 404:
        return "Nothing answers at this path: the webhook URL ends with /webhooks/proximity."
    if status == 503:
        return "The connector cannot store deliveries: its database is unavailable. Run `proximity-sync check`."
    return "The connector rejected the delivery; the response above gives the reason."


def _wait_for_event(settings: Settings, delivery_id: str, timeout: float) -> int:
    """Poll the database until the worker finished the delivery, print the event, and return the exit status."""
    engine = open_database(settings)
    try:
        delivery = _finished_delivery(engine, delivery_id, timeout)
        if delivery is None:
            click.echo(
                f"Delivery {delivery_id} is not in the database {engine.url.render_as_string(hide_password=True)}: "
                "send-test reads DATABASE_URL, which must name the connector's database.",
                err=True,
            )
            return 1
        return _report_result(settings, engine, delivery, timeout)
    finally:
        engine.dispose()


def _finished_delivery(engine: Engine, delivery_id: str, timeout: float) -> Delivery | None:
    """Return the delivery once it is no longer pending, or as it is when the time is up."""
    deadline = time.monotonic() + timeout
    delivery = None
    while True:
        with Session(engine, expire_on_commit=False) as session:
            delivery = session.execute(select(Delivery).where(Delivery.delivery_id == delivery_id)).scalar_one_or_none()
        if delivery is not None and delivery.state != DeliveryState.PENDING:
            return delivery
        if time.monotonic() >= deadline:
            return delivery
        time.sleep(POLL_SECONDS)


def _report_result(settings: Settings, engine: Engine, delivery: Delivery, timeout: float) -> int:
    if delivery.state == DeliveryState.PENDING:
        detail = f"; last error: {delivery.last_error}" if delivery.last_error else ""
        click.echo(f"Still pending after {timeout:g} s ({format_attempts(delivery.attempts)} failed{detail}). Is a worker running?", err=True)
        return 1
    if delivery.state == DeliveryState.FAILED:
        click.echo(f"Failed: {delivery.last_error}", err=True)
        return 1

    click.echo(f"Worker: {delivery.state}: {delivery.outcome}")
    with Session(engine) as session:
        mapping = session.get(BookingMapping, delivery.booking_id)
    if mapping is None or mapping.state != "live" or not mapping.calendar_id or not mapping.event_id:
        state = mapping.state if mapping is not None else "none"
        click.echo(f"Booking {delivery.booking_id} has no calendar event now (state {state}).")
        return 0

    click.echo(f"Calendar event: {mapping.event_id} in calendar {mapping.calendar_id}")
    return _print_event(settings, engine, Target(mapping.calendar_id, mapping.acting_user), mapping.event_id)


def _print_event(settings: Settings, engine: Engine, target: Target, event_id: str) -> int:
    """Read the event back from the calendar and print its summary, time and link."""
    from connector.app import build_backend
    from connector.calendars.google_auth import CredentialsFileError

    try:
        backend: CalendarBackend = build_backend(settings, engine)
    except CredentialsFileError as error:
        click.echo(f"Reading the event back failed: GOOGLE_CREDENTIALS_FILE: {error}", err=True)
        return 1
    try:
        event = backend.get_event(target, event_id)
    except CalendarError as error:
        click.echo(f"Reading the event back failed: {error.describe()}", err=True)
        return 1
    finally:
        backend.close()

    if event is None or not event.is_live:
        click.echo(f"The calendar has no live event {event_id}: it was deleted in the calendar meanwhile.", err=True)
        return 1

    body = event.body
    click.echo(f"  summary: {body.get('summary', '')}")
    click.echo(f"  start:   {_event_time(body.get('start'))}")
    click.echo(f"  end:     {_event_time(body.get('end'))}")
    click.echo(f"  status:  {event.status}")
    if body.get("htmlLink"):
        click.echo(f"  link:    {body['htmlLink']}")
    return 0


def _event_time(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("dateTime") or value.get("date") or "-")
    return "-"
