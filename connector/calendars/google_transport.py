"""HTTP transport for the Google backend: one shared httpx.Client behind two small adapters.

The Google API client library expects an `httplib2.Http`, which is not thread-safe, and
google-auth expects a `google.auth.transport.Request`. Both adapters here send through one
`httpx.Client`, which is thread-safe, pools connections and enforces timeouts:

- `AuthRequest` is the google-auth transport used for token refreshes.
- `AuthorizedHttp` offers the `request()` method of `httplib2.Http` that
  `HttpRequest.execute(http=...)` calls, and adds one user's bearer token to each request.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol
from urllib.parse import urlsplit

import google.auth.exceptions
import google.auth.transport
import httplib2
import httpx

from connector.calendars.base import CalendarError, PermanentCalendarError, TransientCalendarError

logger = logging.getLogger(__name__)

# Headers that httpx computes from the body it actually sends.
_REQUEST_HEADERS_TO_DROP = frozenset({"content-length", "host"})

# httpx decodes gzip and deflate bodies, so these response headers would describe bytes
# that the caller does not receive.
_RESPONSE_HEADERS_TO_DROP = frozenset({"content-encoding", "content-length"})


def make_client(timeout: float, max_connections: int = 32) -> httpx.Client:
    """Create the pooled client that carries token and API requests, with `timeout` seconds per phase."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        trust_env=False,
    )


def describe_url(url: str) -> str:
    """Return the scheme, host and path of `url` for messages, without its query string."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def translate_transport_error(error: httpx.HTTPError, method: str, url: str) -> CalendarError:
    """Turn an httpx failure into a calendar error: network trouble is transient, a bad URL is not."""
    where = f"{method} {describe_url(url)}"

    if isinstance(error, httpx.TimeoutException):
        return TransientCalendarError(f"{where} timed out ({type(error).__name__})")

    retryable = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError, httpx.DecodingError)
    if isinstance(error, retryable):
        return TransientCalendarError(f"{where} failed: {type(error).__name__}: {error}")

    return PermanentCalendarError(
        f"{where} failed and cannot succeed as configured: {type(error).__name__}: {error}"
    )


class _AuthResponse(google.auth.transport.Response):
    """An httpx response in the shape google-auth reads."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._response.headers)

    @property
    def data(self) -> bytes:
        return self._response.content


class AuthRequest(google.auth.transport.Request):
    """The google-auth transport over httpx, used to fetch and refresh access tokens."""

    def __init__(self, client: httpx.Client, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _AuthResponse:
        """Send one token request, or raise google.auth's TransportError when it cannot complete."""
        try:
            response = self._client.request(
                method,
                url,
                content=body,
                headers=headers,
                timeout=timeout if timeout is not None else self._timeout,
            )
        except httpx.HTTPError as error:
            message = f"{method} {describe_url(url)} failed: {type(error).__name__}: {error}"
            raise google.auth.exceptions.TransportError(message) from error
        return _AuthResponse(response)


class Authorizer(Protocol):
    """Adds one user's credentials to API requests."""

    def authorize(self, method: str, url: str, headers: dict[str, str]) -> str | None:
        """Add the authorization header, refreshing the token first if needed, and return the token used."""
        ...

    def refresh_rejected(self, rejected_token: str | None) -> None:
        """Refresh the token after the API rejected `rejected_token` with 401."""
        ...


class AuthorizedHttp:
    """The part of `httplib2.Http` that the API client library calls, for one user.

    Safe to share between threads: it keeps no per-request state, and the httpx client and
    the authorizer are thread-safe.
    """

    def __init__(self, client: httpx.Client, authorizer: Authorizer) -> None:
        self._client = client
        self._authorizer = authorizer

    def request(
        self,
        uri: str,
        method: str = "GET",
        body: str | bytes | None = None,
        headers: dict[str, str] | None = None,
        redirections: int = httplib2.DEFAULT_MAX_REDIRECTS,
        connection_type: Any = None,
    ) -> tuple[httplib2.Response, bytes]:
        """Send an authorized request, and after a 401 refresh the token once and send it again.

        Raises a CalendarError when the request cannot complete (timeout, connection
        failure) or the token cannot be obtained. `redirections` and `connection_type`
        exist for signature compatibility and are ignored, because the Calendar API does
        not redirect.
        """
        request_headers = {
            name.lower(): value
            for name, value in (headers or {}).items()
            if name.lower() not in _REQUEST_HEADERS_TO_DROP
        }
        token = self._authorizer.authorize(method, uri, request_headers)
        response = self._send(method, uri, body, request_headers)

        if response.status_code == 401:
            logger.debug("%s %s returned 401, so the token is refreshed once", method, describe_url(uri))
            self._authorizer.refresh_rejected(token)
            request_headers.pop("authorization", None)
            self._authorizer.authorize(method, uri, request_headers)
            response = self._send(method, uri, body, request_headers)

        return to_httplib2_response(response), response.content

    def close(self) -> None:
        """Do nothing: the shared client belongs to the backend."""

    def _send(
        self, method: str, uri: str, body: str | bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        try:
            return self._client.request(method, uri, content=body, headers=headers)
        except httpx.HTTPError as error:
            raise translate_transport_error(error, method, uri) from error


class UnboundHttp:
    """The `http` given to the discovery client, which must never send a request itself.

    Every call passes a per-user AuthorizedHttp to `execute(http=...)`. A request that
    reaches this object was built without one, which is a programming error.
    """

    def request(self, uri: str, method: str = "GET", *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{method} {describe_url(uri)} was sent without per-user credentials. "
            "Pass http= to execute()"
        )

    def close(self) -> None:
        """Do nothing: this object holds no connections."""


def to_httplib2_response(response: httpx.Response) -> httplib2.Response:
    """Convert an httpx response to the httplib2 form: lower-case headers plus "status"."""
    info = {
        name.lower(): value
        for name, value in response.headers.items()
        if name.lower() not in _RESPONSE_HEADERS_TO_DROP
    }
    info["status"] = str(response.status_code)
    info["content-length"] = str(len(response.content))

    converted = httplib2.Response(info)
    converted.reason = response.reason_phrase
    return converted
