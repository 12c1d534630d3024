"""Retention of stored deliveries: when raw payloads are cleared and delivery records deleted.

A finished delivery (applied, stale or ignored) keeps its raw body, which contains the invitee's
details, for `payload_days` after it finished, and its record (delivery id and body digest, the
memory that recognises Proximity's retries and replays) for `delivery_days`.

Never pruned:

- pending and failed deliveries, because they are work still owed: their bodies are what a
  retry or `proximity-sync replay` applies;
- the newest applied delivery of a booking whose event is live, until the booking is over
  (marked completed or no-show, or its end time is older than `payload_days`), because
  reconciling a calendar against the mapping table re-applies that snapshot. Bookings whose event
  was deleted or carried over to a rescheduled booking are over already.

Each statement touches at most `batch_size` rows, so the receiver's commits never wait long for
the database (SQLite has one writer at a time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ColumnElement

from connector.decisions import MappingState
from connector.envelope import EnvelopeError, parse_envelope, parse_timestamp
from connector.storage import BookingMapping, Delivery, DeliveryState, read_only, utcnow

log = logging.getLogger(__name__)

FINISHED_STATES = (DeliveryState.APPLIED, DeliveryState.STALE, DeliveryState.IGNORED)

# Events after which a booking's calendar event is final, so its snapshot need not be kept.
BOOKING_OVER_EVENTS = frozenset({"booking.completed", "booking.noShow"})

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished deliveries keep their payload and their record, in days."""

    payload_days: float = 7.0
    delivery_days: float = 30.0


@dataclass(frozen=True)
class PruneReport:
    """The counts of one prune, and the cut-off times it used."""

    payloads_cleared: int
    deliveries_deleted: int
    snapshots_kept: int
    payload_cutoff: datetime
    delivery_cutoff: datetime

    @property
    def changed_anything(self) -> bool:
        return bool(self.payloads_cleared or self.deliveries_deleted)


def prune(
    engine: Engine,
    policy: RetentionPolicy,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> PruneReport:
    """Clear old payloads and delete old delivery records, keeping what the policy protects.

    `on_batch`, if given, is called with the number of rows each committed batch changed.
    """
    now = now or utcnow()
    payload_cutoff = now - timedelta(days=policy.payload_days)
    delivery_cutoff = now - timedelta(days=policy.delivery_days)

    kept, over = _split_newest_snapshots(engine, max(payload_cutoff, delivery_cutoff), payload_cutoff)
    protected = Delivery.id.in_(_newest_live_snapshots()) & Delivery.id.not_in(over or [-1])
    finished = Delivery.state.in_(FINISHED_STATES) & ~protected

    cleared = _in_batches(
        engine,
        finished & (Delivery.finished_at < payload_cutoff) & Delivery.body.is_not(None),
        lambda ids: update(Delivery).where(Delivery.id.in_(ids)).values(body=None),
        batch_size,
        on_batch,
    )
    deleted = _in_batches(
        engine,
        finished & (Delivery.finished_at < delivery_cutoff),
        lambda ids: delete(Delivery).where(Delivery.id.in_(ids)),
        batch_size,
        on_batch,
    )
    return PruneReport(cleared, deleted, len(kept), payload_cutoff, delivery_cutoff)


def _newest_live_snapshots():
    """Select the row id of each live booking's newest applied delivery."""
    return (
        select(Delivery.id)
        .join(BookingMapping, BookingMapping.last_delivery_id == Delivery.delivery_id)
        .where(BookingMapping.state == MappingState.LIVE.value, Delivery.state == DeliveryState.APPLIED)
    )


def _split_newest_snapshots(engine: Engine, older_than: datetime, payload_cutoff: datetime) -> tuple[list[int], list[int]]:
    """Split the live bookings' newest snapshots old enough to prune into kept ones and ones whose booking is over."""
    query = (
        select(Delivery.id, Delivery.event, Delivery.body)
        .where(Delivery.id.in_(_newest_live_snapshots()), Delivery.finished_at < older_than)
    )
    kept: list[int] = []
    over: list[int] = []
    with read_only(engine).connect() as connection:
        for row_id, event, body in connection.execute(query):
            (over if _booking_over(event, body, payload_cutoff) else kept).append(row_id)
    return kept, over


def _booking_over(event: str, body: bytes | None, cutoff: datetime) -> bool:
    """Tell whether a booking ended before `cutoff` or was marked completed or no-show."""
    if event in BOOKING_OVER_EVENTS or body is None:
        return True
    try:
        end_time = parse_envelope(body).payload.get("endTime")
    except EnvelopeError:
        return True
    ends = parse_timestamp(end_time) if isinstance(end_time, str) else None
    return ends is not None and ends < cutoff


def _in_batches(
    engine: Engine,
    condition: ColumnElement[bool],
    statement_for: Callable[[list[int]], Executable],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Apply the statement to the rows matching `condition`, `batch_size` rows per transaction."""
    total = 0
    while True:
        with engine.begin() as connection:
            ids = connection.execute(select(Delivery.id).where(condition).limit(batch_size)).scalars().all()
            if ids:
                connection.execute(statement_for(ids))
        total += len(ids)
        if ids and on_batch is not None:
            on_batch(len(ids))
        if len(ids) < batch_size:
            return total


class Pruner:
    """Runs `prune` in a background thread: once at start, then every `interval_seconds`."""

    def __init__(self, engine: Engine, policy: RetentionPolicy, interval_seconds: float) -> None:
        self.engine = engine
        self.policy = policy
        self.interval_seconds = interval_seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        """Start pruning in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the prune in progress, if any."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                report = prune(self.engine, self.policy)
            except Exception as error:
                log.error("pruning old deliveries failed, trying again in %.0f s: %s", self.interval_seconds, error)
            else:
                level = logging.INFO if report.changed_anything else logging.DEBUG
                log.log(level, "pruned deliveries: %s", describe(report))
            self._stopped.wait(self.interval_seconds)


def describe(report: PruneReport) -> str:
    """Return a one-line account of a prune for logs and the command line."""
    return (
        f"cleared the payloads of {report.payloads_cleared} deliveries finished before "
        f"{_iso(report.payload_cutoff)}, deleted {report.deliveries_deleted} delivery records finished before "
        f"{_iso(report.delivery_cutoff)}, kept {report.snapshots_kept} old payloads that are the newest snapshot "
        "of a booking still live"
    )


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

