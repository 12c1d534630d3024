"""Assembling the connector from its settings: database, calendar, mappings, receiver and worker."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from connector.calendars.base import CalendarBackend
from connector.health import watch_worker_progress
from connector.intake import DeliveryIntake
from connector.mappings import Mappings, load_mappings
from connector.notify import DeliveryListener
from connector.receiver import ConnectorApp, WebhookReceiver, create_app
from connector.retention import Pruner, RetentionPolicy
from connector.schema import prepare_schema
from connector.settings import Settings
from connector.storage import make_engine
from connector.sync import BookingSync, DeliveryBackoff
from connector.worker import StopSignal, SyncWorker, new_owner_id

log = logging.getLogger(__name__)

# Database connections a process needs besides its sync threads: the worker's dispatcher, the
# intake's writer thread and, on SQLite, its checkpoint thread, and health checks or feed
# requests. The pool may add as many again for bursts.
EXTRA_CONNECTIONS = 5


def build_backend(settings: Settings, engine: Engine, stop_signal: StopSignal | None = None) -> CalendarBackend:
    """Create the calendar backend the settings name; its waits end early once `stop_signal` is set."""
    if settings.backend_name == "google":
        from connector.calendars.google import GoogleCalendar
        from connector.pacing import Pacer
        from connector.retries import RetryPolicy

        sleep = stop_signal.sleep if stop_signal is not None else time.sleep
        return GoogleCalendar(
            settings.google_credentials_file,
            settings.google_api_endpoint,
            timeout=settings.call_timeout_seconds,
            retry_policy=RetryPolicy(max_attempts=settings.call_max_attempts, sleep=sleep),
            pacer=Pacer(settings.google_user_requests_per_minute, settings.google_project_requests_per_minute, sleep=sleep),
            max_connections=max(settings.worker_threads * 2, 8),
        )

    from connector.calendars.ics import IcsCalendar

    return IcsCalendar(engine)


@dataclass
class Connector:
    """The connector's parts, built once per process."""

    settings: Settings
    engine: Engine
    backend: CalendarBackend
    mappings: Mappings
    worker: SyncWorker | None = None
    listener: DeliveryListener | None = None
    intake: DeliveryIntake | None = None
    extra_routes: list = field(default_factory=list)

    def close(self) -> None:
        """Stop the worker, flush the intake, and release connections."""
        if self.listener is not None:
            self.listener.stop()
        if self.intake is not None:
            self.intake.close()
        if self.worker is not None:
            self.worker.stop()
        self.backend.close()
        self.engine.dispose()
        if self.listener is not None:
            self.listener.join()


def build_connector(settings: Settings, *, with_worker: bool = True) -> Connector:
    """Open the database, load the mappings, and create the backend and worker.

    Raises SchemaError when the database is unreachable or its schema is out of date (SQLite
    is upgraded in place instead). On PostgreSQL the worker's wake-up listener starts here.
    """
    mappings = load_mappings(settings.mappings_dir)
    pool_size = settings.worker_threads + EXTRA_CONNECTIONS if with_worker else EXTRA_CONNECTIONS
    engine = make_engine(settings.database_url, pool_size=pool_size)
    try:
        prepare_schema(engine)
    except Exception:
        engine.dispose()
        raise

    stop_signal = StopSignal()
    backend = build_backend(settings, engine, stop_signal)
    connector = Connector(settings=settings, engine=engine, backend=backend, mappings=mappings)

    if with_worker:
        booking_sync = BookingSync(
            engine,
            backend,
            mappings.router,
            mappings.template,
            owner=new_owner_id(),
            lease_seconds=settings.lease_seconds,
            backoff=DeliveryBackoff(
                settings.delivery_retry_base_seconds,
                settings.delivery_retry_max_seconds,
                settings.delivery_max_attempts,
            ),
        )
        connector.worker = SyncWorker(
            engine,
            booking_sync,
            threads=settings.worker_threads,
            poll_seconds=settings.worker_poll_seconds,
            lease_seconds=settings.lease_seconds,
            stop_signal=stop_signal,
            housekeeping=_pruner(settings, engine),
        )
        if engine.dialect.name == "postgresql":
            connector.listener = DeliveryListener(engine, connector.worker.wake)
            connector.listener.start()

    if backend.name == "ics":
        from connector.calendars.ics import feed_routes

        connector.extra_routes = feed_routes(backend)
    return connector


def _pruner(settings: Settings, engine: Engine) -> Pruner | None:
    """Return the worker's periodic pruning of old payloads and deliveries, unless it is turned off."""
    if not settings.prune_interval_seconds:
        return None
    policy = RetentionPolicy(settings.payload_retention_days, settings.delivery_retention_days)
    return Pruner(engine, policy, settings.prune_interval_seconds)


def build_web_app(connector: Connector) -> ConnectorApp:
    """Create the ASGI app: receiver, health checks, feeds; the worker runs in its lifespan."""
    settings = connector.settings
    worker = connector.worker
    connector.intake = DeliveryIntake(connector.engine, on_commit=worker.wake if worker else None)
    receiver = WebhookReceiver(connector.intake, settings.webhook_secrets, settings.webhook_max_body_bytes)
    watch_worker_progress(connector.engine, settings.ready_stall_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            connector.close()

    return create_app(receiver, connector.engine, connector.extra_routes, lifespan=lifespan)
