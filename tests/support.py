"""Helpers shared by the tests: booking payloads, signed deliveries, and a running connector."""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from connector.app import Connector, build_connector, build_web_app
from connector.operator.send_test import SAMPLE_BOOKING
from connector.schema import upgrade_schema
from connector.settings import Settings, load_settings
from connector.storage import BookingMapping, Delivery, DeliveryState, make_engine, utcnow

SECRET = "whsec_test_0123456789"

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


def connector_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Return settings for a connector whose database and mappings live in `tmp_path`."""
    mappings = tmp_path / "mappings"
    mappings.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "proximity_webhook_secret": SECRET,
        "mappings_dir": mappings,
        "worker_poll_seconds": 0.05,
        "delivery_retry_base_seconds": 0.05,
        "delivery_retry_max_seconds": 0.2,
        "call_max_attempts": 2,
        "call_timeout_seconds": 5.0,
    }
    values.update(overrides)
    if "database_url" not in values:
        values["database_url"] = test_database_url(tmp_path)
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


# ----- the test database -----

# PROXIMITY_TEST_DATABASE=postgresql runs every connector that `connector_settings` configures on
# PostgreSQL instead of SQLite, each test in a fresh schema of the database below.
TEST_DATABASE = os.environ.get("PROXIMITY_TEST_DATABASE", "sqlite").strip().lower()
POSTGRES_URL = os.environ.get("PROXIMITY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SCHEMA_PREFIX = "proximity_test_"

# Schemas left behind by a test run that was killed are dropped by a later run after this long.
ABANDONED_SCHEMA_SECONDS = 24 * 3600


def running_in_ci() -> bool:
    """Tell whether the suite runs in CI, where a missing PostgreSQL fails the tests instead of skipping them."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def test_database_url(tmp_path: Path) -> str:
    """Return the connector database of a test: a SQLite file in `tmp_path`, or a fresh PostgreSQL schema."""
    if TEST_DATABASE != "postgresql":
        return f"sqlite:///{tmp_path / 'connector.db'}"
    if PostgresSchemas.current is None:
        raise RuntimeError("PostgreSQL test schemas exist only while a test runs")
    return PostgresSchemas.current.migrated_url(tmp_path)


@functools.cache
def postgres_unreachable_reason() -> str | None:
    """Return why the test PostgreSQL server cannot be used, or None when it accepts connections; checked once per run."""
    engine = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        return f"PostgreSQL at {make_url(POSTGRES_URL).render_as_string(hide_password=True)} is unreachable: {cause}"
    finally:
        engine.dispose()
    return None


def require_postgres() -> None:
    """Skip the calling test when PostgreSQL is unreachable; fail it instead in CI."""
    reason = postgres_unreachable_reason()
    if reason is None:
        return
    if running_in_ci():
        pytest.fail(f"{reason} (CI=true, so PostgreSQL tests fail instead of skipping)")
    pytest.skip(reason)


class PostgresSchemas:
    """Throwaway schemas of the test database for one test, dropped when the test ends.

    Each schema's URL sets `search_path` to it, so the connector and Alembic create and find
    their tables there, and sets `application_name` to it, so that every connection of the test
    (subprocesses included) can be found and terminated.
    """

    current: PostgresSchemas | None = None

    def __init__(self) -> None:
        self._admin = create_engine(POSTGRES_URL, poolclass=NullPool)
        self._names: list[str] = []
        self._by_path: dict[Path, str] = {}

    def create(self) -> str:
        """Create an empty schema and return its connector database URL."""
        name = f"{SCHEMA_PREFIX}{int(time.time())}_{os.getpid()}_{secrets.token_hex(4)}"
        with self._admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        self._names.append(name)
        return self.url(name)

    def migrated_url(self, tmp_path: Path) -> str:
        """Return the schema of `tmp_path` with every migration applied, creating it on first use."""
        if tmp_path not in self._by_path:
            url = self.create()
            engine = make_engine(url, pool_size=1)
            try:
                upgrade_schema(engine)
            finally:
                engine.dispose()
            self._by_path[tmp_path] = url
        return self._by_path[tmp_path]

    @staticmethod
    def url(name: str) -> str:
        """Return the database URL whose connections use schema `name`."""
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name}", "application_name": name})
        return url.render_as_string(hide_password=False)

    @staticmethod
    def schema_of(url: str) -> str:
        """Return the schema name a URL made by `url` points to."""
        return str(make_url(url).query["application_name"])

    def terminate_connections(self, url: str) -> int:
        """Terminate every server connection that uses the schema of `url`; return how many there were."""
        with self._admin.begin() as connection:
            return len(connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = :name AND pid <> pg_backend_pid()"),
                {"name": self.schema_of(url)},
            ).all())

    def admin_engine(self) -> Engine:
        """Return an engine on the test database itself, outside the test's schemas."""
        return self._admin

    def drop_all(self) -> None:
        """Terminate the schemas' connections, then drop the schemas and everything in them."""
        for name in self._names:
            self.terminate_connections(self.url(name))
            with self._admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        self._names.clear()
        self._by_path.clear()
        self._admin.dispose()


def drop_abandoned_schemas() -> None:
    """Drop test schemas that runs killed before their clean-up left behind a day or more ago."""
    cutoff = time.time() - ABANDONED_SCHEMA_SECONDS
    engine = create_engine(POSTGRES_URL, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            names = connection.execute(
                text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :prefix"), {"prefix": SCHEMA_PREFIX + "%"}
            ).scalars().all()
            for name in names:
                created = name.removeprefix(SCHEMA_PREFIX).split("_", 1)[0]
                if created.isdigit() and int(created) < cutoff:
                    connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    finally:
        engine.dispose()
