"""`proximity-sync reconcile`: report drift between the mapping table and the calendars, and repair it.

`--fix` makes the calendars match the newest applied snapshots. A missing or changed event is
repaired by the worker's own code: the booking's newest applied delivery is queued again, and
`BookingSync` re-renders and writes it while this command holds the booking's lease. Duplicate and
unknown events are deleted, but only those whose id proves that the connector wrote them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import asdict
from datetime import datetime

import click
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from connector.calendars.base import CalendarBackend, CalendarError, RemoteEvent, Target
from connector.decisions import MappingState, digest_fields
from connector.envelope import parse_timestamp
from connector.operator.common import build_command_connector, command_settings
from connector.operator.drift import CalendarScan, Drift, DriftFinder, DriftKind
from connector.operator.progress import progress
from connector.queue import acquire_lease, release_lease
from connector.storage import BookingMapping, Delivery, DeliveryState, utcnow
from connector.sync import BookingSync

log = logging.getLogger(__name__)

FIX_HINT = "Run `proximity-sync reconcile --fix` to repair it."


@click.command("reconcile")
@click.option("--host", metavar="EMAIL", help="Only this host's bookings, and every booking event in the host's calendar.")
@click.option("--since", metavar="DATE", help="Only bookings and events that start at or after this ISO 8601 date or time.")
@click.option("--fix", is_flag=True, help="Repair the drift: restore missing and changed events, delete extra ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")
def reconcile(host: str | None, since: str | None, fix: bool, as_json: bool) -> None:
    """Compare the mapping table with the calendars, and report (or with --fix repair) the drift.

    The exit status is 0 when no drift remains and every calendar could be read, and 1 otherwise.
    """
    since_time = _parse_since(since)
    if host is not None and "@" not in host:
        raise click.BadParameter(f"{host!r} is not an email address", param_hint="--host")

    settings = command_settings()
    connector = build_command_connector(settings, with_worker=fix)
    try:
        finder = DriftFinder(connector.engine, connector.backend, connector.mappings, host=host, since=since_time)
        scans, drift, compared = _find_drift(finder, show_progress=not as_json)
        if fix:
            fixer = DriftFixer(connector.engine, connector.backend, connector.worker.booking_sync, settings.lease_seconds)
            fixer.fix_all(finder, drift, show_progress=not as_json)
    finally:
        connector.close()

    report = _report(scans, drift, compared, finder)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(report, fix)
    if report["remaining"] or report["errors"]:
        sys.exit(1)


def _parse_since(since: str | None) -> datetime | None:
    if since is None:
        return None
    moment = parse_timestamp(since)
    if moment is None:
        raise click.BadParameter(f"{since!r} is not an ISO 8601 date or time, such as 2026-03-01", param_hint="--since")
    return moment


def _find_drift(finder: DriftFinder, show_progress: bool) -> tuple[list[CalendarScan], list[Drift], int]:
    rows = finder.bookings()
    targets = finder.calendars(rows)

    with progress(targets, "Reading calendars", enabled=show_progress) as items:
        scans = [finder.scan(target) for target in items]

    drift: list[Drift] = []
    with progress(rows, "Comparing bookings", enabled=show_progress) as items:
        for row in items:
            drift.extend(finder.compare(row))
    drift.extend(finder.leftovers())
    return scans, drift, len(rows)


class DriftFixer:
    """Repairs drift: re-applies the newest snapshot through `BookingSync`, deletes extra events."""

    def __init__(self, engine: Engine, backend: CalendarBackend, booking_sync: BookingSync, lease_seconds: float) -> None:
        self.engine = engine
        self.backend = backend
        self.booking_sync = booking_sync
        self.owner = booking_sync.owner
        self.lease_seconds = lease_seconds

    def fix_all(self, finder: DriftFinder, drift: list[Drift], show_progress: bool) -> None:
        """Fix each booking's drift, deleting extra events before restoring the booking's own.

        Deleting first matters: an extra event may use the id that re-creating the event would
        take, and the worker adopts a live event under that id instead of writing a new one.
        """
        by_booking: dict[str, list[Drift]] = {}
        for item in drift:
            by_booking.setdefault(item.booking_id, []).append(item)

        with progress(list(by_booking.items()), "Fixing bookings", enabled=show_progress) as bookings:
            for booking_id, items in bookings:
                if not acquire_lease(self.engine, booking_id, self.owner, self.lease_seconds):
                    for item in items:
                        item.result = "not fixed: a worker is syncing this booking right now; run reconcile again"
                    continue
                try:
                    for item in sorted(items, key=lambda entry: entry.kind in (DriftKind.MISSING, DriftKind.CHANGED)):
                        self._fix(finder, item)
                finally:
                    release_lease(self.engine, booking_id, self.owner)

    def _fix(self, finder: DriftFinder, item: Drift) -> None:
        if item.kind in (DriftKind.DUPLICATE, DriftKind.UNKNOWN):
            self._delete(item)
        else:
            self._reapply(finder, item)

    def _delete(self, item: Drift) -> None:
        if not item.deletable:
            item.result = (
                "not fixed: the connector did not write this event (its id is not derived from a booking id), "
                "so it is left alone; delete it in the calendar if it is not wanted"
            )
            return
        try:
            self.backend.delete_event(Target(item.calendar_id, item.acting_user), item.event_id)
        except CalendarError as error:
            item.result = f"not fixed: deleting failed: {error.describe()}"
            return
        item.fixed = True
        item.result = f"fixed: deleted event {item.event_id} from {item.calendar_id}"
        log.info("reconcile: booking %s: deleted %s event %s from %s", item.booking_id, item.kind.value, item.event_id, item.calendar_id)

    def _reapply(self, finder: DriftFinder, item: Drift) -> None:
        """Queue the booking's newest applied delivery again, and let BookingSync write it now."""
        row = finder.mapping(item.booking_id)
        delivery = finder.applied_delivery(row) if row is not None else None
        if row is None or delivery is None or delivery.body is None:
            item.result = (
                "not fixed: the payload of the booking's newest applied delivery is no longer stored; "
                "the next delivery of the booking restores the event"
            )
            return

        mapping_values: dict = {"version": None, "rank": 0}
        if item.kind is DriftKind.MISSING:
            # The event id stays recorded, so BookingSync creates the next generation's event.
            mapping_values["state"] = MappingState.DELETED.value
        else:
            mapping_values["field_digests"] = json.dumps(self._calendar_digests(item, row, finder), sort_keys=True)

        with self.engine.begin() as connection:
            connection.execute(update(BookingMapping).where(BookingMapping.booking_id == row.booking_id).values(**mapping_values))
            connection.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow(), last_error=None, finished_at=None)
            )

        self.booking_sync.sync(row.booking_id)
        self._record_outcome(item, delivery)

    def _calendar_digests(self, item: Drift, row: BookingMapping, finder: DriftFinder) -> dict[str, str]:
        """Return the digests of the connector's fields as the calendar contains them now.

        Recorded as what was written, they make BookingSync patch exactly the fields that differ
        from the snapshot, and remove the ones the snapshot no longer has.
        """
        event = self._current_event(item)
        written = json.loads(row.field_digests or "{}")
        names = set(written) | set(finder.desired_body(row) or {})
        return digest_fields({name: event.body[name] for name in names if event is not None and name in event.body})

    def _current_event(self, item: Drift) -> RemoteEvent | None:
        try:
            return self.backend.get_event(Target(item.calendar_id, item.acting_user), item.event_id)
        except CalendarError:
            return None

    def _record_outcome(self, item: Drift, delivery: Delivery) -> None:
        with Session(self.engine) as session:
            current = session.get(Delivery, delivery.id)
            state, outcome, error = current.state, current.outcome, current.last_error

        if state == DeliveryState.APPLIED:
            item.fixed = True
            item.result = f"fixed: {outcome}"
        elif state == DeliveryState.PENDING:
            item.result = f"not fixed yet: {error}; the worker tries again"
        else:
            self._restore_version(item.booking_id, delivery)
            item.result = f"not fixed: {error or outcome}"

    def _restore_version(self, booking_id: str, delivery: Delivery) -> None:
        """Put back the applied version, so an older delivery arriving late stays stale."""
        with self.engine.begin() as connection:
            connection.execute(
                update(BookingMapping)
                .where(BookingMapping.booking_id == booking_id, BookingMapping.version.is_(None))
                .values(version=delivery.version, rank=delivery.rank)
            )


def _report(scans: list[CalendarScan], drift: list[Drift], compared: int, finder: DriftFinder) -> dict:
    errors = [f"calendar {scan.target.calendar_id} could not be read: {scan.error}" for scan in scans if scan.error]
    errors += finder.errors
    return {
        "bookings_compared": compared,
        "calendars": [
            {"calendar": scan.target.calendar_id, "booking_events": len(scan.events), "error": scan.error}
            for scan in scans
        ],
        "drift": [{**asdict(item), "kind": item.kind.value} for item in drift],
        "counts": dict(Counter(item.kind.value for item in drift)),
        "fixed": sum(item.fixed for item in drift),
        "remaining": sum(not item.fixed for item in drift),
        "skipped_busy": sorted(finder.busy),
        "errors": errors,
    }


def _print_report(report: dict, fix: bool) -> None:
    calendars = len(report["calendars"])
    click.echo(f"Compared {report['bookings_compared']} bookings with {calendars} calendar{'' if calendars == 1 else 's'}.")

    for item in report["drift"]:
        click.echo(f"{item['kind']:<9}  booking {item['booking_id']}  calendar {item['calendar_id']}  event {item['event_id']}: {item['detail']}")
        if item["result"]:
            click.echo(f"           {item['result']}")

    for error in report["errors"]:
        click.echo(f"error: {error}")
    if report["skipped_busy"]:
        click.echo(f"Skipped {len(report['skipped_busy'])} bookings that the worker is syncing now: {', '.join(report['skipped_busy'])}")

    total = len(report["drift"])
    if total == 0:
        click.echo("No drift found.")
        return
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(report["counts"].items()))
    if fix:
        click.echo(f"Drift: {counts}. Fixed {report['fixed']} of {total}; {report['remaining']} left.")
    elif any(_fixable(item) for item in report["drift"]):
        click.echo(f"Drift: {counts}. {FIX_HINT}")
    else:
        click.echo(f"Drift: {counts}. The connector did not write these events: delete them in the calendar if they are not wanted.")


def _fixable(item: dict) -> bool:
    """Tell whether `--fix` acts on a reported drift: every kind but events the connector did not write."""
    return item["kind"] in (DriftKind.MISSING.value, DriftKind.CHANGED.value) or item["deletable"]
