"""Prometheus metrics the connector records.

The receiver and the worker update these module-level instruments; `GET /metrics` exposes them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
LAST_CALENDAR_WRITE = Gauge(
    "proximity_last_calendar_write_timestamp_seconds",
    "Unix time of the last successful calendar write.",
)
