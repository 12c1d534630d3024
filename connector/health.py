"""Health and monitoring endpoints.

`/healthz` responds while the process runs. `/readyz` responds with 200 only while the process can
do its work: the database is reachable, the receiver's writes finish, and the worker makes
progress on the queue. `/metrics`
serves the Prometheus exposition.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from connector.metrics import render_metrics

if TYPE_CHECKING:
    from connector.intake import DeliveryIntake
from connector.storage import Delivery, DeliveryState, read_only, utcnow

log = logging.getLogger(__name__)

# The stall limit of each engine's readiness check, set by `watch_worker_progress`. It is kept
# per engine because `health_routes` is called by the receiver's app factory, which has no settings.
_stall_limits: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def watch_worker_progress(engine: Engine, stall_seconds: float) -> None:
    """Make `/readyz` of apps on `engine` fail when the worker stalls; 0 turns the check off."""
    _stall_limits[engine] = stall_seconds


def health_routes(engine: Engine, intake: DeliveryIntake | None = None) -> list[BaseRoute]:
    """Return the `/healthz`, `/readyz` and `/metrics` routes; `/readyz` also watches `intake`, if given."""

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_request: Request) -> Response:
        # In WAL mode SQLite still serves reads while another process holds the write lock, so the
        # ping below would pass while every delivery gets a 503 response.
        if intake is not None and intake.write_seconds() > intake.ack_timeout:
            stuck = (
                f"deliveries are not being stored: the receiver's database write has run for "
                f"{intake.write_seconds():.1f} s, and each delivery gets a 503 response after {intake.ack_timeout:g} s"
            )
            log.warning("readiness check failed: %s", stuck)
            return PlainTextResponse(stuck, status_code=503)

        try:
            await run_in_threadpool(_ping, engine)
        except Exception as error:
            log.warning("readiness check failed: database unreachable: %s", error)
            return PlainTextResponse("database unreachable", status_code=503)

        stall_seconds = _stall_limits.get(engine, 0.0)
        if stall_seconds > 0:
            try:
                stall = await run_in_threadpool(find_stall, engine, stall_seconds)
            except Exception as error:
                log.warning("readiness check failed: reading the queue failed: %s", error)
                return PlainTextResponse("database unreachable", status_code=503)
            if stall is not None:
                log.warning("readiness check failed: %s", stall)
                return PlainTextResponse(stall, status_code=503)
        return PlainTextResponse("ready")

    async def metrics(_request: Request) -> Response:
        body, content_type = await run_in_threadpool(render_metrics, engine)
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def find_stall(engine: Engine, stall_seconds: float) -> str | None:
    """Describe a stalled worker, or return None when it keeps up.

    The worker is stalled when a pending delivery has been due for `stall_seconds` and no
    delivery finished (applied, stale or failed) during that time. A delivery waiting for its
    retry is not due, so a calendar outage alone does not count as a stall.
    """
    limit = utcnow() - timedelta(seconds=stall_seconds)
    oldest_due = select(func.min(Delivery.next_attempt_at)).where(Delivery.state == DeliveryState.PENDING)
    overdue = (
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= limit)
    )
    # NOTE: this scans the deliveries table, because finished_at has no index; it runs only
    # when a delivery is overdue.
    last_finished = select(func.max(Delivery.finished_at)).where(
        Delivery.state.in_((DeliveryState.APPLIED, DeliveryState.STALE, DeliveryState.FAILED))
    )

    with read_only(engine).connect() as connection:
        oldest = _aware(connection.execute(oldest_due).scalar())
        if oldest is None or oldest > limit:
            return None
        finished = _aware(connection.execute(last_finished).scalar())
        if finished is not None and finished > limit:
            return None
        count = connection.execute(overdue).scalar_one()

    since = "no delivery has finished yet" if finished is None else f"the last delivery finished at {finished:%Y-%m-%dT%H:%M:%SZ}"
    return (
        f"worker stalled: {count} deliveries have been due for more than {stall_seconds:.0f} s, "
        f"and {since}; check that a worker runs (`proximity-sync serve` or `proximity-sync worker`)"
    )


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=utcnow().tzinfo)
    return moment


def _ping(engine: Engine) -> None:
    with read_only(engine).connect() as connection:
        connection.execute(text("SELECT 1"))
