"""Assembling the connector from its settings: database, calendar, mappings, receiver and worker."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from connector.calendars.base import CalendarBackend
from connector.intake import DeliveryIntake
from connector.mappings import Mappings, load_mappings
from connector.receiver import WebhookReceiver, create_app
from connector.settings import Settings
from connector.storage import create_tables, make_engine
from connector.sync import BookingSync, DeliveryBackoff
from connector.worker import SyncWorker, new_owner_id

log = logging.getLogger(__name__)


def build_backend(settings: Settings, engine: Engine) -> CalendarBackend:
    """Create the calendar backend the settings name."""
    if settings.backend_name == "google":
        from connector.calendars.google import GoogleCalendar
        from connector.pacing import Pacer
        from connector.retries import RetryPolicy

        return GoogleCalendar(
            settings.google_credentials_file,
            settings.google_api_endpoint,
            timeout=settings.call_timeout_seconds,
            retry_policy=RetryPolicy(max_attempts=settings.call_max_attempts),
            pacer=Pacer(settings.google_user_requests_per_minute, settings.google_project_requests_per_minute),
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
    intake: DeliveryIntake | None = None
    extra_routes: list = field(default_factory=list)

    def close(self) -> None:
        """Stop the worker, flush the intake, and release connections."""
        if self.intake is not None:
            self.intake.close()
        if self.worker is not None:
            self.worker.stop()
        self.backend.close()
        self.engine.dispose()


def build_connector(settings: Settings, *, with_worker: bool = True) -> Connector:
    """Open the database, load the mappings, and create the backend and worker."""
    mappings = load_mappings(settings.mappings_dir)
    engine = make_engine(settings.database_url, pool_size=settings.worker_threads + 4)
    create_tables(engine)
    backend = build_backend(settings, engine)
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
        )

    if backend.name == "ics":
        from connector.calendars.ics import feed_routes

        connector.extra_routes = feed_routes(backend)
    return connector


def build_web_app(connector: Connector) -> Starlette:
    """Create the ASGI app: receiver, health checks, feeds; the worker runs in its lifespan."""
    settings = connector.settings
    worker = connector.worker
    connector.intake = DeliveryIntake(connector.engine, on_commit=worker.wake if worker else None)
    receiver = WebhookReceiver(connector.intake, settings.webhook_secrets, settings.webhook_max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            connector.close()

    return create_app(receiver, connector.engine, connector.extra_routes, lifespan=lifespan)
