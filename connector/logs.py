"""Logging set-up shared by every command: text or JSON lines on standard error.

While the worker syncs a booking, `bind_delivery` stores the booking and delivery ids in a
context variable of that thread. Every record logged meanwhile gets them as the `booking_id`
and `delivery_id` attributes, so the line of each calendar call names its delivery. With
`LOG_FORMAT=json` these attributes, and any passed with `extra=`, become fields of the line.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers of client libraries that log request URLs and retries at INFO; they stay quiet
# unless the connector runs at DEBUG.
NOISY_LOGGERS = ("googleapiclient", "google.auth", "httpx", "httpcore", "uvicorn.access")

_bound_delivery: ContextVar[tuple[str, str] | None] = ContextVar("proximity_delivery", default=None)

# The attributes of every LogRecord; any other attribute came from `extra=` or a filter.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

# Extra attributes that JSON lines leave out: uvicorn passes `color_message`, a copy of the
# message with terminal colour codes, with its own lines.
_OMITTED_EXTRAS = frozenset({"color_message"})


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send log lines to standard error, as `time level logger: message` or as JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(DeliveryContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def bind_delivery(booking_id: str, delivery_id: str) -> None:
    """Tag the records this thread logs from now on with a booking and a delivery.

    NOTE: the tag stays until the thread binds another delivery or calls `clear_delivery`, so
    a line logged after a sync by the same thread still names that sync's delivery.
    """
    _bound_delivery.set((booking_id, delivery_id))


def clear_delivery() -> None:
    """Stop tagging this thread's records with a delivery."""
    _bound_delivery.set(None)


def outcome_fields(outcome: str, mapping: Any, duration_ms: float) -> dict[str, Any]:
    """Return the `extra=` fields of a delivery outcome line: action, calendar, outcome, duration.

    `mapping` is the mapping row the sync wrote, or None; its target names the calendar.
    """
    target = getattr(mapping, "target", None)
    return {
        "action": outcome_action(outcome),
        "calendar": getattr(target, "calendar_id", None),
        "outcome": outcome,
        "duration_ms": round(duration_ms, 1),
    }


def outcome_action(outcome: str) -> str:
    """Return the verb that starts a worker outcome, such as created, updated, deleted or stale."""
    words = outcome.split(maxsplit=1)
    if not words or words[0] == "no":
        return "none"
    return words[0].rstrip(":")


class DeliveryContextFilter(logging.Filter):
    """Adds the bound booking and delivery ids to each record that does not set them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _bound_delivery.get()
        if bound is not None:
            record.__dict__.setdefault("booking_id", bound[0])
            record.__dict__.setdefault("delivery_id", bound[1])
        return True


class TextFormatter(logging.Formatter):
    """The text format, with the booking and delivery appended when the message lacks them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        booking_id = getattr(record, "booking_id", None)
        delivery_id = getattr(record, "delivery_id", None)
        if booking_id and booking_id not in record.message:
            line += f" (booking {booking_id}, delivery {delivery_id})"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD_ATTRIBUTES or name in _OMITTED_EXTRAS or name.startswith("_"):
                continue
            entry[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)
