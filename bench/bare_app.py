"""The baseline server: a Starlette endpoint that reads the body and responds 200, nothing else.

It is served as `proximity-sync serve` serves the connector (connector/cli.py): on a socket bound
by `listen_socket`, by a `uvicorn.Server` with the same options. So the difference in throughput
is the connector's own work: HMAC check, envelope parsing and the durable insert.

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
from connector.cli import listen_socket


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

    # The same calls as `proximity-sync serve` makes at its default LOG_LEVEL=INFO.
    listener = listen_socket(arguments.host, arguments.port)
    config = uvicorn.Config(app, log_level="info", access_log=False, log_config=None)
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
