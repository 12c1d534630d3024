"""The baseline server: a Starlette endpoint that reads the body and responds 200, nothing else.

It runs under `uvicorn.run` with the same arguments as `proximity-sync serve` (connector/cli.py),
so the difference in throughput is the connector's own work: HMAC check, envelope parsing and
the durable insert.

    python -m bench.bare_app --port 8001
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bench.payloads import WEBHOOK_PATH


async def receive(request: Request) -> Response:
    """Read the whole body and respond 200 with a small JSON body, as the connector does."""
    body = await request.body()
    return JSONResponse({"status": "accepted", "bytes": len(body)})


async def healthz(_request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]), Route("/healthz", healthz)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()

    # The same call as `proximity-sync serve` makes at its default LOG_LEVEL=INFO.
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
