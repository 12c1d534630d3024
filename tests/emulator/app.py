"""The Starlette application: the token endpoint and the Calendar v3 event routes."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.emulator.errors import AUTH_ERROR_MESSAGE, ApiError, OAuthError, json_response
from tests.emulator.faults import Fault, FaultList
from tests.emulator.store import CalendarStore, QueryParameters, single
from tests.emulator.tokens import TokenIssuer

logger = logging.getLogger(__name__)

API_PREFIX = "/calendar/v3/"
SEND_SCOPE_KEY = "emulator.connection_send"

# Recorded headers leave out the bearer token.
UNRECORDED_HEADERS = frozenset({"authorization"})

UNSUPPORTED_EVENT_METHODS = frozenset({"import", "quickAdd", "watch"})


@dataclass(frozen=True)
class RecordedRequest:
    """One Calendar API call and the emulator's response.

    `method` is the effective method after any `X-HTTP-Method-Override`. `query` maps each
    parameter to its value, or to a list when the parameter repeats. `status` 0 means the
    emulator closed the connection without sending a response.
    """

    method: str
    path: str
    query: dict[str, str | list[str]]
    status: int
    calendar_id: str | None
    event_id: str | None
    user: str | None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    fault: Fault | None = None


@dataclass(frozen=True)
class ApiRoute:
    """The API operation a path names, with its decoded calendar and event ids."""

    operation: str
    calendar_id: str | None = None
    event_id: str | None = None


@dataclass
class ApiCall:
    """The parts of an HTTP request that the Calendar API routes use."""

    method: str
    path: str
    segments: list[str]
    query: QueryParameters
    body: bytes
    headers: dict[str, str]


class EmulatorApp:
    """The ASGI application. It also hands each request's connection to the handler, so a fault can drop it."""

    def __init__(self, store: CalendarStore, issuer: TokenIssuer, faults: FaultList) -> None:
        self._store = store
        self._issuer = issuer
        self._faults = faults
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        # Counts `clear_requests` calls. A call that started before the latest one, such as a call
        # held by a fault's delay while its test ended, is neither executed nor recorded after it.
        self._epoch = 0
        self.latency = 0.0
        self._starlette = Starlette(
            routes=[
                Route("/token", self.token, methods=["POST"]),
                Route(
                    API_PREFIX + "{rest:path}",
                    self.calendar_api,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                ),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette wraps `send`, so the server's own callable is kept here for dropping connections.
        if scope["type"] == "http":
            scope[SEND_SCOPE_KEY] = send
        await self._starlette(scope, receive, send)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The recorded Calendar API calls, in the order the emulator responded."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded Calendar API calls, and the ones still in progress."""
        with self._lock:
            self._requests.clear()
            self._epoch += 1

    async def token(self, request: Request) -> Response:
        """POST /token: exchange a JWT assertion or a refresh token for an access token."""
        raw_body = await request.body()
        form = dict(parse_qsl(raw_body.decode("utf-8", errors="replace"), keep_blank_values=True))

        try:
            document = self._issuer.exchange(form)
        except OAuthError as error:
            logger.info("Token request rejected: %s", error)
            return error.response()
        return json_response(document, headers={"Cache-Control": "no-store"})

    async def calendar_api(self, request: Request) -> Response:
        """Handle one Calendar API call: latency, authentication, faults, the operation, recording."""
        epoch = self._epoch
        call = await read_call(request)
        if self.latency > 0:
            await asyncio.sleep(self.latency)

        route: ApiRoute | None = None
        calendar_id: str | None = None
        user: str | None = None
        fault: Fault | None = None
        drop = False

        try:
            route = resolve_route(call.method, call.segments)
            calendar_id = route.calendar_id

            user = self._authenticated_user(call)
            if calendar_id == "primary":
                calendar_id = user

            fault = self._faults.take(call.method, call.path, calendar_id)
            if fault is not None and not fault.after_commit:
                await asyncio.sleep(fault.delay)
                drop = fault.drops_connection
                if fault.status is not None:
                    raise fault.error()

            if epoch != self._epoch:
                raise ApiError(503, "backendError", "The emulator was reset while this call waited.")
            response = self._execute(route, user, calendar_id, call)
        except ApiError as error:
            response = error.response()
        except Exception as error:
            logger.exception("Emulator failed on %s %s", call.method, call.path)
            response = ApiError(500, "backendError", f"The emulator failed: {error!r}").response()

        if fault is not None and fault.after_commit:
            # The change is stored. The client sees only the error, as when a response is lost.
            await asyncio.sleep(fault.delay)
            drop = fault.drops_connection
            if fault.status is not None:
                response = fault.error().response()

        transport = connection_transport(request) if drop else None
        if drop and transport is None:
            logger.warning("Cannot drop the connection: the server's send callable has no transport")
            response = ApiError(502, "backendError", "The emulator could not drop the connection.").response()

        # Record before closing, so the call is recorded by the time the client sees the closed connection.
        self._record(call, route, calendar_id, user, 0 if transport else response.status_code, fault, epoch)
        if transport is not None:
            transport.close()
            # Let the server notice the closed connection, so it discards the response that follows.
            await asyncio.sleep(0)
        return response

    def _authenticated_user(self, call: ApiCall) -> str:
        """Return the acting user of the call's bearer token, or raise 401 as Google does."""
        grant = self._issuer.authenticate(call.headers.get("authorization"))
        if grant is None:
            raise ApiError(
                401,
                "authError",
                AUTH_ERROR_MESSAGE,
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
            )
        return grant.user

    def _execute(self, route: ApiRoute, user: str, calendar_id: str | None, call: ApiCall) -> Response:
        """Run the routed operation against the store and render its result."""
        operation = route.operation
        event_id = route.event_id
        assert calendar_id is not None
        if_match = call.headers.get("if-match")

        if operation == "calendars.get":
            return json_response(self._store.calendar_resource(user, calendar_id))
        if operation == "events.list":
            return json_response(self._store.list(user, calendar_id, call.query))
        if operation == "events.insert":
            return json_response(self._store.insert(user, calendar_id, parse_json_object(call.body)))

        assert event_id is not None
        if operation == "events.get":
            resource = self._store.get(user, calendar_id, event_id)
            if call.headers.get("if-none-match") == resource["etag"]:
                return Response(status_code=304, headers={"ETag": resource["etag"]})
            return json_response(resource)
        if operation == "events.patch":
            body = parse_json_object(call.body)
            return json_response(self._store.patch(user, calendar_id, event_id, body, if_match))
        if operation == "events.update":
            body = parse_json_object(call.body)
            return json_response(self._store.update(user, calendar_id, event_id, body, if_match))
        if operation == "events.delete":
            self._store.delete(user, calendar_id, event_id, if_match)
            return Response(status_code=204)
        if operation == "events.move":
            destination = single(call.query, "destination")
            if destination == "primary":
                destination = user
            return json_response(self._store.move(user, calendar_id, event_id, destination))

        raise ApiError(501, "notImplemented", f"The emulator does not implement {operation}.")

    def _record(
        self,
        call: ApiCall,
        route: ApiRoute | None,
        calendar_id: str | None,
        user: str | None,
        status: int,
        fault: Fault | None,
        epoch: int,
    ) -> None:
        try:
            body = json.loads(call.body) if call.body and call.method != "GET" else None
        except ValueError:
            body = None

        query = {name: values[0] if len(values) == 1 else list(values) for name, values in call.query.items()}
        headers = {name: value for name, value in call.headers.items() if name not in UNRECORDED_HEADERS}
        record = RecordedRequest(
            method=call.method,
            path=call.path,
            query=query,
            status=status,
            calendar_id=calendar_id,
            event_id=route.event_id if route else None,
            user=user,
            body=body,
            headers=headers,
            fault=fault,
        )
        with self._lock:
            if epoch == self._epoch:
                self._requests.append(record)


async def read_call(request: Request) -> ApiCall:
    """Read the method, decoded path segments, query and body, undoing the client's method override.

    google-api-python-client sends a GET longer than 2048 characters as a POST with
    `X-HTTP-Method-Override: GET` and the query in a form-encoded body.
    """
    method = request.method
    override = request.headers.get("x-http-method-override")
    if method == "POST" and override:
        method = override.upper()

    body = await request.body()
    query = parse_qs(request.url.query, keep_blank_values=True)
    if request.method == "POST" and method == "GET":
        for name, values in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items():
            query.setdefault(name, []).extend(values)
        body = b""

    # The raw path keeps %2F inside ids, so split before decoding.
    raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
    raw_rest = raw_path.decode("latin-1").split("?", 1)[0][len(API_PREFIX) :]
    segments = [unquote(segment) for segment in raw_rest.split("/")]

    headers = {name.lower(): value for name, value in request.headers.items()}
    return ApiCall(method, request.scope["path"], segments, query, body, headers)


def resolve_route(method: str, segments: list[str]) -> ApiRoute:
    """Map a method and the path segments after `/calendar/v3/` to an operation, or raise 404."""
    if len(segments) < 2 or segments[0] != "calendars" or not segments[1]:
        raise ApiError(404, "notFound", "Not Found")
    calendar_id = segments[1]

    if len(segments) == 2 and method == "GET":
        return ApiRoute("calendars.get", calendar_id)

    if len(segments) < 3 or segments[2] != "events":
        raise ApiError(404, "notFound", "Not Found")

    if len(segments) == 3:
        if method == "GET":
            return ApiRoute("events.list", calendar_id)
        if method == "POST":
            return ApiRoute("events.insert", calendar_id)

    if len(segments) == 4 and segments[3]:
        event_id = segments[3]
        if method == "POST" and event_id in UNSUPPORTED_EVENT_METHODS:
            return ApiRoute(f"events.{event_id}", calendar_id)

        operations = {"GET": "events.get", "PATCH": "events.patch", "PUT": "events.update", "DELETE": "events.delete"}
        if method in operations:
            return ApiRoute(operations[method], calendar_id, event_id)

    if len(segments) == 5 and segments[3]:
        if segments[4] == "move" and method == "POST":
            return ApiRoute("events.move", calendar_id, segments[3])
        if segments[4] == "instances" and method == "GET":
            return ApiRoute("events.instances", calendar_id, segments[3])

    raise ApiError(404, "notFound", "Not Found")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON request body, which must be an object. An empty body counts as `{}`."""
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except ValueError:
        raise ApiError(400, "parseError", "Parse Error") from None

    if not isinstance(document, dict):
        raise ApiError(400, "parseError", "Parse Error")
    return document


def connection_transport(request: Request) -> Any:
    """Return the asyncio transport of the request's connection, or None when the server hides it."""
    send = request.scope.get(SEND_SCOPE_KEY)
    return getattr(getattr(send, "__self__", None), "transport", None)
