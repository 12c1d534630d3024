"""Helpers shared by the tests: booking payloads, signed deliveries, and a running connector."""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from starlette.testclient import TestClient

from connector.app import Connector, build_connector, build_web_app
from connector.settings import Settings, load_settings
from connector.storage import BookingMapping, Delivery, DeliveryState, utcnow

SECRET = "whsec_test_0123456789"

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

_delivery_numbers = itertools.count(1)


def booking(**changes: Any) -> dict[str, Any]:
    """Return a copy of the documented sample booking with some fields changed."""
    payload = copy.deepcopy(SAMPLE_BOOKING)
    payload.update(changes)
    return payload


@dataclass(frozen=True)
class SignedDelivery:
    """A delivery as Proximity sends it: raw body and headers."""

    body: bytes
    headers: dict[str, str]

    @property
    def delivery_id(self) -> str:
        return self.headers["X-Webhook-Delivery"]


def signed_delivery(
    event: str,
    payload: dict[str, Any],
    created_at: str = "2026-03-16T14:05:00Z",
    *,
    delivery_id: str | None = None,
    secret: str = SECRET,
) -> SignedDelivery:
    """Build and sign a delivery with a fresh delivery id unless one is given."""
    envelope = {"event": event, "createdAt": created_at, "payload": payload}
    body = json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Event": event,
        "X-Webhook-Signature": hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest(),
        "X-Webhook-Delivery": delivery_id or f"dlv_{next(_delivery_numbers):06d}",
    }
    return SignedDelivery(body, headers)


def test_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Return settings for a connector whose database and mappings live in `tmp_path`."""
    mappings = tmp_path / "mappings"
    mappings.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "proximity_webhook_secret": SECRET,
        "database_url": f"sqlite:///{tmp_path / 'connector.db'}",
        "mappings_dir": mappings,
        "worker_poll_seconds": 0.05,
        "delivery_retry_base_seconds": 0.05,
        "delivery_retry_max_seconds": 0.2,
        "call_max_attempts": 2,
        "call_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return load_settings(**values)


class RunningConnector:
    """A connector running in-process: the Starlette app with its worker, driven by HTTP."""

    def __init__(self, connector: Connector, client: TestClient) -> None:
        self.connector = connector
        self.client = client

    def send(self, delivery: SignedDelivery, headers: dict[str, str] | None = None):
        merged = dict(delivery.headers)
        merged.update(headers or {})
        return self.client.post("/webhooks/proximity", content=delivery.body, headers=merged)

    def deliver(self, event: str, payload: dict[str, Any], created_at: str = "2026-03-16T14:05:00Z", **kwargs: Any):
        """Send a signed delivery and return the response."""
        return self.send(signed_delivery(event, payload, created_at, **kwargs))

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Wait until no delivery is due and the worker has nothing in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.due_count() == 0 and self.connector.worker.in_flight() == 0:
                time.sleep(0.02)
                if self.due_count() == 0 and self.connector.worker.in_flight() == 0:
                    return
            time.sleep(0.02)
        raise AssertionError(f"the worker did not finish within {timeout} s: {self.deliveries()}")

    def due_count(self) -> int:
        with self.connector.engine.begin() as connection:
            return connection.execute(
                select(func.count()).select_from(Delivery).where(
                    Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= utcnow()
                )
            ).scalar_one()

    def deliveries(self, booking_id: str | None = None) -> list[dict[str, Any]]:
        query = select(Delivery.delivery_id, Delivery.booking_id, Delivery.event, Delivery.state,
                       Delivery.attempts, Delivery.outcome, Delivery.last_error).order_by(Delivery.id)
        if booking_id:
            query = query.where(Delivery.booking_id == booking_id)
        with self.connector.engine.begin() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def mapping(self, booking_id: str) -> dict[str, Any] | None:
        with self.connector.engine.begin() as connection:
            row = connection.execute(
                select(BookingMapping.__table__).where(BookingMapping.booking_id == booking_id)
            ).first()
        return dict(row._mapping) if row else None


@contextmanager
def running_connector(settings: Settings) -> Iterator[RunningConnector]:
    """Run the connector's app and worker for the length of the block."""
    connector = build_connector(settings)
    app = build_web_app(connector)
    with TestClient(app) as client:
        yield RunningConnector(connector, client)
