"""Prometheus metrics the connector records, and their exposition for `GET /metrics`.

The receiver, the worker and the Google backend update the module-level instruments. The
queue depth, the age of the oldest pending delivery and the count of failed deliveries are
read from the database at scrape time, so every process reports the same shared queue.

Several processes (a receiver and separate workers, or several receivers) are aggregated by
prometheus-client's multiprocess mode: set the environment variable PROMETHEUS_MULTIPROC_DIR
to the same empty, writable folder for every process before they start, and empty it again
before a restart. It must be a real environment variable, because prometheus-client reads it
when it is imported, before the `.env` file is read. Each process then writes its instruments
to files in that folder, and `/metrics` of any process sums them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from datetime import UTC

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from connector.storage import Delivery, DeliveryState, read_only, utcnow

log = logging.getLogger(__name__)

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

RECEIVED_OUTCOMES = ("accepted", "duplicate", "ignored", "bad_signature", "too_large", "malformed", "unavailable")
FINISHED_RESULTS = ("applied", "stale", "retried", "failed")

# Calendar API methods that change a calendar; a successful one sets LAST_CALENDAR_WRITE.
WRITE_METHODS = frozenset({"events.insert", "events.patch", "events.update", "events.delete", "events.move"})

DELIVERIES_RECEIVED = Counter(
    "proximity_deliveries_received_total",
    "Webhook deliveries received, by outcome.",
    ["outcome"],
)
ACK_LATENCY = Histogram(
    "proximity_ack_latency_seconds",
    "Time from the start of a webhook request to its answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DELIVERIES_FINISHED = Counter(
    "proximity_deliveries_processed_total",
    "Deliveries the worker processed, by result: applied, stale, retried or failed.",
    ["result"],
)
CALENDAR_CALLS = Counter(
    "proximity_calendar_calls_total",
    "Calendar API calls, by method and HTTP status.",
    ["method", "status"],
)
LAST_WRITE_METRIC = "proximity_last_calendar_write_timestamp_seconds"
LAST_CALENDAR_WRITE = Gauge(
    LAST_WRITE_METRIC,
    "Unix time of the last successful calendar write.",
    multiprocess_mode="max",
)

# Series that exist from the start, so a rate over them is defined before the first event.
for _outcome in RECEIVED_OUTCOMES:
    DELIVERIES_RECEIVED.labels(_outcome)
for _result in FINISHED_RESULTS:
    DELIVERIES_FINISHED.labels(_result)


def record_calendar_call(method: str, status: int | str) -> None:
    """Count one calendar API call, and note the time when it was a successful write.

    `status` is the HTTP status, or a word such as the error class when no response came.

    NOTE: only the Google backend calls this; the ics backend writes to the database and its
    writes are not counted here.
    """
    method = method.split(" ", 1)[0]
    CALENDAR_CALLS.labels(method, str(status)).inc()

    succeeded = status == "ok" or (isinstance(status, int) and 200 <= status < 300)
    if succeeded and method in WRITE_METHODS:
        LAST_CALENDAR_WRITE.set(time.time())


def is_multiprocess() -> bool:
    """Tell whether the instruments are shared through PROMETHEUS_MULTIPROC_DIR files."""
    return bool(os.environ.get(MULTIPROCESS_DIR_VARIABLE))


def render_metrics(engine: Engine) -> tuple[bytes, str]:
    """Return the Prometheus text exposition of every metric, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    source = MultiProcessCollector(None) if is_multiprocess() else REGISTRY
    registry.register(InstrumentCollector(source))
    registry.register(QueueCollector(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class InstrumentCollector(Collector):
    """Forwards the instruments of this process, or of every process in multiprocess mode.

    It adds `proximity_seconds_since_last_calendar_write`, computed at scrape time from the
    newest write time; the series is left out until a write has happened.
    """

    def __init__(self, source: Collector) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        last_write = 0.0
        for family in self._source.collect():
            if family.name == LAST_WRITE_METRIC:
                last_write = max((sample.value for sample in family.samples), default=0.0)
            yield family

        since = GaugeMetricFamily(
            "proximity_seconds_since_last_calendar_write",
            "Seconds since the last successful calendar write.",
        )
        if last_write > 0:
            since.add_metric([], max(time.time() - last_write, 0.0))
        yield since


class QueueCollector(Collector):
    """Reads the delivery queue from the database at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            depth, oldest, failed = read_queue(self._engine)
        except SQLAlchemyError as error:
            log.warning("metrics: reading the delivery queue failed: %s", error)
            return

        yield GaugeMetricFamily(
            "proximity_queue_depth",
            "Deliveries waiting to be applied (state pending), due now or later.",
            value=depth,
        )
        yield GaugeMetricFamily(
            "proximity_queue_oldest_pending_age_seconds",
            "Seconds since the oldest pending delivery was received; 0 when none is pending.",
            value=oldest,
        )
        yield GaugeMetricFamily(
            "proximity_failed_deliveries",
            "Deliveries that failed for good and wait for `proximity-sync replay`.",
            value=failed,
        )


def read_queue(engine: Engine) -> tuple[int, float, int]:
    """Return the pending count, the oldest pending age in seconds, and the failed count."""
    pending = select(func.count(), func.min(Delivery.received_at)).where(Delivery.state == DeliveryState.PENDING)
    failed = select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.FAILED)

    with read_only(engine).connect() as connection:
        depth, oldest_received = connection.execute(pending).one()
        failed_count = connection.execute(failed).scalar_one()

    age = 0.0
    if oldest_received is not None:
        if oldest_received.tzinfo is None:
            oldest_received = oldest_received.replace(tzinfo=UTC)
        age = max((utcnow() - oldest_received).total_seconds(), 0.0)
    return depth, age, failed_count
