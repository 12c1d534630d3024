"""Runs an ASGI application with uvicorn in a background thread on a loopback port."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0


class BackgroundServer:
    """A uvicorn server in a daemon thread of the test process."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, port: int = 0) -> int:
        """Bind 127.0.0.1:`port` (0 picks a free port), serve in a thread and return the port once it accepts."""
        if self.running:
            assert self.port is not None
            return self.port

        # asyncio turns on TCP_NODELAY only for sockets whose protocol is IPPROTO_TCP. Without it,
        # every response waits about 40 ms for the client's delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK_HOST, port))
        self.port = listener.getsockname()[1]

        config = uvicorn.Config(
            self._app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            # httplib2 keeps connections open between calls. Long keep-alive spares reconnects.
            timeout_keep_alive=30,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [listener]},
            name=f"calendar-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the emulator server on {LOOPBACK_HOST}:{self.port} failed to start")
            time.sleep(0.005)

        logger.info("Calendar emulator listening on http://%s:%d", LOOPBACK_HOST, self.port)
        return self.port

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        if self._server is None or self._thread is None:
            return

        self._server.should_exit = True
        self._thread.join(SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            logger.warning("Calendar emulator on port %s did not stop within %.0f s", self.port, SHUTDOWN_TIMEOUT)
        else:
            logger.info("Calendar emulator on port %s stopped", self.port)

        self._server = None
        self._thread = None
