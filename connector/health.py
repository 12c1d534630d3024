"""Health endpoints: `/healthz` says the process answers, `/readyz` that it can do its work."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

log = logging.getLogger(__name__)


def health_routes(engine: Engine) -> list[BaseRoute]:
    """Return `/healthz` (the process answers) and `/readyz` (the database answers)."""

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_request: Request) -> Response:
        try:
            await run_in_threadpool(_ping, engine)
        except Exception as error:
            log.warning("readiness check failed: database unreachable: %s", error)
            return PlainTextResponse("database unreachable", status_code=503)
        return PlainTextResponse("ready")

    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
