"""The webhook receiver: verify, store durably, acknowledge. No calendar work happens here."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from connector.envelope import EnvelopeError, check_delivery_id, parse_envelope
from connector.health import health_routes
from connector.intake import DeliveryIntake, DeliveryRecord, IntakeTimeoutError
from connector.metrics import ACK_LATENCY, DELIVERIES_RECEIVED, RECEIVED_OUTCOMES
from connector.signatures import SignatureError, verify
from connector.storage import DeliveryState

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/proximity"

# A delivery whose createdAt is further ahead of this server's clock is rejected with 400. The
# worker applies a snapshot only if it is newer than the booking's applied one, so a createdAt
# years ahead would make every later change of the booking look stale. An hour leaves room for
# clocks that drift apart.
MAX_CREATED_AHEAD_SECONDS = 3600

# The counter of each outcome, looked up once instead of by label on every request.
_RECEIVED_BY_OUTCOME = {outcome: DELIVERIES_RECEIVED.labels(outcome) for outcome in RECEIVED_OUTCOMES}


class BodyTooLargeError(Exception):
    """The request body is larger than the configured limit."""


class ClientDisconnectedError(Exception):
    """The client closed the connection before sending the whole body."""


class WebhookReceiver:
    """The ASGI endpoint of `POST /webhooks/proximity`.

    It reads the scope's headers and sends its responses itself, without Starlette's `Request`
    and `Response` objects, because every delivery passes through here and those objects add
    work per request that this endpoint does not need.
    """

    def __init__(self, intake: DeliveryIntake, secrets: Sequence[str], max_body_bytes: int) -> None:
        self.intake = intake
        self.secrets = list(secrets)
        self.max_body_bytes = max_body_bytes
        self._latest_version = ("", -1)  # the newest accepted createdAt, and the second it was computed in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Respond to one delivery and record its outcome and latency."""
        started = time.perf_counter()
        status, content, outcome = await self._handle(scope, receive, started)

        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode("ascii")),
        ]})
        await send({"type": "http.response.body", "body": content})

        _RECEIVED_BY_OUTCOME[outcome].inc()
        ACK_LATENCY.observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, started: float) -> tuple[int, bytes, str]:
        headers = _webhook_headers(scope)
        delivery_id = headers.get("x-webhook-delivery", "").strip()

        try:
            body = await self._read_body(receive, headers.get("content-length"))
        except BodyTooLargeError:
            log.warning("delivery %s rejected: body larger than %d bytes", delivery_id or "-", self.max_body_bytes)
            return *_refusal(413, f"body larger than {self.max_body_bytes} bytes"), "too_large"
        except ClientDisconnectedError:
            return *_refusal(400, "client disconnected before sending the whole body"), "malformed"

        try:
            verify(body, headers.get("x-webhook-signature"), self.secrets)
        except SignatureError as error:
            log.warning("delivery %s rejected: %s", delivery_id or "-", error)
            return *_refusal(401, str(error)), "bad_signature"

        try:
            envelope = parse_envelope(body, headers.get("x-webhook-event"), exact_numbers=False)
        except EnvelopeError as error:
            log.warning("delivery %s rejected: %s", delivery_id or "-", error)
            return *_refusal(400, str(error)), "malformed"
        try:
            delivery_id = check_delivery_id(delivery_id)
        except EnvelopeError as error:
            log.warning("delivery %s rejected: %s", repr(delivery_id[:80]) if delivery_id else "-", error)
            return *_refusal(400, str(error)), "malformed"

        latest = self._latest_accepted_version()
        if envelope.version > latest:
            log.warning(
                "delivery %s rejected: createdAt %s is more than %d s ahead of this server's clock",
                delivery_id, envelope.version, MAX_CREATED_AHEAD_SECONDS,
            )
            reason = (
                f"envelope createdAt {envelope.version} is more than {MAX_CREATED_AHEAD_SECONDS} s ahead of "
                f"this server's clock, which accepts up to {latest}; check the clocks of the sender and the receiver"
            )
            return *_refusal(400, reason), "malformed"

        state = DeliveryState.PENDING if envelope.is_known_event else DeliveryState.IGNORED
        record = DeliveryRecord(
            delivery_id=delivery_id,
            body_digest=hashlib.sha256(body).hexdigest(),
            event=envelope.event,
            version=envelope.version,
            rank=envelope.rank,
            booking_id=envelope.booking_id,
            body=body,
            state=state,
        )
        try:
            stored = await self.intake.store(record)
        except IntakeTimeoutError as error:
            # The commit may still succeed, and Proximity's retry is then a duplicate.
            log.warning("delivery %s got a 503 response: %s", delivery_id, error)
            return *_refusal(503, "storage unavailable, retry later"), "unavailable"
        except Exception as error:
            log.error("delivery %s not stored, answered 503: %s", delivery_id, error)
            return *_refusal(503, "storage unavailable, retry later"), "unavailable"

        outcome = "duplicate" if not stored else ("ignored" if state == DeliveryState.IGNORED else "accepted")
        # Logged at DEBUG: a line per delivery at INFO cost more than the HMAC check at full load,
        # and the worker logs every applied delivery at INFO anyway.
        if log.isEnabledFor(logging.DEBUG):
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.debug(
                "delivery %s %s: %s booking %s (%.1f ms)",
                delivery_id, outcome, envelope.event, envelope.booking_id or "-", elapsed_ms,
            )
        return 200, orjson.dumps({"status": outcome, "delivery": delivery_id}), outcome

    def _latest_accepted_version(self) -> str:
        """Return the newest createdAt accepted now, computed once per second."""
        second = int(time.time())
        if self._latest_version[1] != second:
            self._latest_version = (latest_accepted_version(second), second)
        return self._latest_version[0]

    async def _read_body(self, receive: Receive, declared: str | None) -> bytes:
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLargeError

        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectedError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# The request headers the receiver reads; a delivery's other headers are not looked at.
_READ_HEADERS = frozenset((b"x-webhook-delivery", b"x-webhook-signature", b"x-webhook-event", b"content-length"))


def latest_accepted_version(now: float) -> str:
    """Return the newest createdAt accepted at Unix time `now`, in the format of `normalize_timestamp`.

    Versions are fixed-width UTC text, such as 2026-03-16T14:05:00.000000Z, so they compare as strings.
    """
    moment = datetime.fromtimestamp(int(now) + MAX_CREATED_AHEAD_SECONDS, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _webhook_headers(scope: Scope) -> dict[str, str]:
    """Return the headers the receiver reads, by lowercase name; the first of repeated headers wins."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _READ_HEADERS:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def _refusal(status: int, reason: str) -> tuple[int, bytes]:
    return status, orjson.dumps({"error": reason})


class ConnectorApp:
    """The ASGI application: a delivery goes straight to the receiver, every other request to Starlette.

    Skipping Starlette's error middleware, exception middleware and router saved about 8 µs of
    event-loop CPU per delivery, and `serve --no-worker` acknowledged about 10 % more deliveries
    per second (`python -m bench --only receiver`, 2-core VM). Starlette still handles the rest:
    health checks, feeds, other methods on the webhook path (405), and the webhook path under a
    root path.
    """

    def __init__(self, receiver: WebhookReceiver, starlette: Starlette) -> None:
        self.receiver = receiver
        self.starlette = starlette

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self.receiver(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def create_app(
    receiver: WebhookReceiver,
    engine: Engine,
    extra_routes: Sequence[BaseRoute] = (),
    lifespan=None,
) -> ConnectorApp:
    """Build the ASGI application: the receiver, health checks and `extra_routes`, with `lifespan`."""
    routes: list[BaseRoute] = [Route(WEBHOOK_PATH, receiver, methods=["POST"])]
    routes += health_routes(engine, receiver.intake)
    routes += list(extra_routes)
    starlette = Starlette(routes=routes, lifespan=_with_frozen_startup_objects(lifespan))
    return ConnectorApp(receiver, starlette)


def _with_frozen_startup_objects(lifespan: Callable[[Starlette], Any] | None) -> Callable[[Starlette], Any]:
    """Wrap a lifespan so the objects alive after start-up are left out of garbage collection.

    Start-up loads the API client's discovery document, the ORM metadata and every module, and
    Python's cyclic collector traverses all of them on each full collection, which stopped the
    event loop for up to 60 ms at a time under load. Under the bench's wrk load on a 2-core VM,
    `serve --no-worker` answered with a p99 latency of 65 ms with the collector as is and 12 ms
    with these objects frozen. They are unfrozen at shutdown, so a process that builds several
    apps, such as the test suite, can still collect them afterwards.
    """

    @contextlib.asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if lifespan is not None:
                await stack.enter_async_context(lifespan(app))
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()

    return run
