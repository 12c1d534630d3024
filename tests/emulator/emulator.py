"""The test-facing facade: server lifecycle, credentials, calendar state, faults and recorded calls."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.emulator.app import EmulatorApp, RecordedRequest
from tests.emulator.faults import DROP_CONNECTION, Fault, FaultList
from tests.emulator.keys import generate_authorized_user, generate_service_account_key, write_json_file
from tests.emulator.server import LOOPBACK_HOST, BackgroundServer
from tests.emulator.store import CalendarStore
from tests.emulator.tokens import TokenIssuer, TokenRequest

DEFAULT_CLIENT_EMAIL = "sync@proximity-test.iam.gserviceaccount.com"


class CalendarEmulator:
    """An in-process Google Calendar v3 API and OAuth token endpoint on 127.0.0.1.

    The real google-api-python-client and google-auth talk to it over HTTP, while tests read
    and change its state through this object. All methods are safe to call from any thread.
    """

    def __init__(self) -> None:
        self._store = CalendarStore()
        self._issuer = TokenIssuer()
        self._faults = FaultList()
        self._app = EmulatorApp(self._store, self._issuer, self._faults)
        self._server = BackgroundServer(self._app)

    # ----- lifecycle -----

    def start(self) -> str:
        """Start serving and return the base URL. Calling it again while running changes nothing.

        A restarted emulator reuses its previous port, so key files written earlier stay valid.
        """
        port = self._server.start(self._server.port or 0)
        self._issuer.own_audiences = frozenset({self.token_uri})
        return self.base_url

    def stop(self) -> None:
        """Stop serving. Calendars, events and registered keys stay in memory."""
        self._server.stop()

    def reset(self) -> None:
        """Forget calendars, events, faults and recorded calls, and restore `latency` and `auto_user_calendars`.

        Registered keys, delegation settings and issued access tokens stay valid.
        """
        self._app.clear_requests()  # first, so a call still in progress cannot reach the new store
        self._store.reset()
        self._faults.clear()
        self._issuer.clear_requests()
        self._app.latency = 0.0

    def __enter__(self) -> CalendarEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----- addresses -----

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, without a trailing slash."""
        if self._server.port is None:
            raise RuntimeError("the emulator has no address yet: call start() first")
        return f"http://{LOOPBACK_HOST}:{self._server.port}"

    @property
    def api_endpoint(self) -> str:
        """The `api_endpoint` client option for `googleapiclient.discovery.build`."""
        return f"{self.base_url}/calendar/v3/"

    @property
    def token_uri(self) -> str:
        """The OAuth token endpoint that generated credential files name."""
        return f"{self.base_url}/token"

    # ----- credentials -----

    def make_service_account_key(
        self,
        path: str | Path,
        client_email: str = DEFAULT_CLIENT_EMAIL,
        delegation: bool = True,
    ) -> dict[str, Any]:
        """Write a new service-account JSON key to `path`, register it, and return the key document.

        Keys for the same `client_email` belong to one account with one numeric `client_id`,
        as in Google. `delegation` sets that account's domain-wide delegation: without it,
        token requests that name a subject fail with `unauthorized_client`.
        """
        account = self._issuer.service_account(client_email)
        document, public_key = generate_service_account_key(client_email, account.client_id, self.token_uri)
        self._issuer.add_service_account_key(client_email, document["private_key_id"], public_key, delegation)

        write_json_file(path, document)
        return document

    def set_delegation(self, client_id: str, allowed: bool, scopes: Iterable[str] | str | None = None) -> None:
        """Grant or withdraw domain-wide delegation for a service account, limited to `scopes` when given.

        `client_id` may also be the account's email. Raises KeyError for an unknown account.
        """
        self._issuer.set_delegation(client_id, allowed, scopes)

    def make_authorized_user_file(self, path: str | Path, user: str = "owner@example.com") -> dict[str, Any]:
        """Write an `authorized_user` credential file for `user`, register its refresh token, and return it.

        google-auth 2.63's `Credentials.from_authorized_user_info` ignores the file's
        `token_uri`, so callers apply it with `.with_token_uri(document["token_uri"])`.
        """
        document, registration = generate_authorized_user(user, self.token_uri)
        self._issuer.register_authorized_user(registration)

        write_json_file(path, document)
        return document

    def revoke_access_tokens(self) -> None:
        """Invalidate every issued access token. The next API call fails with 401, so clients refresh."""
        self._issuer.revoke_access_tokens()

    # ----- calendars and events -----

    @property
    def auto_user_calendars(self) -> bool:
        """Whether a calendar whose id is the acting user's email exists without `add_calendar`."""
        return self._store.auto_user_calendars

    @auto_user_calendars.setter
    def auto_user_calendars(self, enabled: bool) -> None:
        self._store.auto_user_calendars = enabled

    def add_calendar(self, calendar_id: str, owner: str | None = None, shared_with: Iterable[str] = ()) -> None:
        """Create a calendar that `owner` and the `shared_with` users may use.

        A calendar with neither owner nor `shared_with` is open to every authenticated user.
        Calling it again for an existing calendar replaces the access rules and keeps the events.
        """
        if isinstance(shared_with, str):
            shared_with = (shared_with,)
        self._store.add_calendar(calendar_id, owner, shared_with)

    def events(self, calendar_id: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        """Return copies of a calendar's stored events ordered by start time."""
        return self._store.events(calendar_id, include_deleted)

    def event(self, calendar_id: str, event_id: str) -> dict[str, Any] | None:
        """Return a copy of a stored event, cancelled or not, or None."""
        return self._store.event(calendar_id, event_id)

    def insert_event_directly(self, calendar_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """Store an event created behind the connector's back and return it.

        Creates the calendar, owned by `calendar_id`, when it does not exist. Raises ApiError
        for a body that the API would reject.
        """
        return self._store.insert_event_directly(calendar_id, event)

    def patch_event_directly(self, calendar_id: str, event_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Edit an event as its host would, with patch semantics, and return it with a new etag.

        Raises KeyError for an unknown event.
        """
        return self._store.patch_event_directly(calendar_id, event_id, changes)

    def delete_event_directly(self, calendar_id: str, event_id: str) -> dict[str, Any]:
        """Cancel an event as its host would and return it. Raises KeyError for an unknown event."""
        return self._store.delete_event_directly(calendar_id, event_id)

    def invalidate_sync_tokens(self) -> None:
        """Make every sync token issued so far fail with 410 `fullSyncRequired`."""
        self._store.invalidate_sync_tokens()

    # ----- recorded calls -----

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the Calendar API calls handled so far, oldest first. Token calls are not included."""
        return self._app.requests

    @property
    def token_requests(self) -> list[TokenRequest]:
        """A snapshot of the token endpoint calls, oldest first."""
        return self._issuer.requests

    # ----- faults and latency -----

    @property
    def latency(self) -> float:
        """Seconds of delay added to every Calendar API call."""
        return self._app.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._app.latency = seconds

    def add_fault(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        status: int | str | None = 503,
        reason: str = "backendError",
        message: str | None = None,
        times: int | None = 1,
        after_commit: bool = False,
        delay: float = 0.0,
        retry_after: int | float | str | None = None,
        calendar_id: str | None = None,
    ) -> Fault:
        """Make the next `times` matching Calendar API calls fail, and return the fault.

        A call matches when its method, decoded path substring and calendar id (with `primary`
        resolved) fit every filter given. The first matching fault wins. Faults apply after
        authentication, so a 401 retry does not consume them.

        `after_commit` stores the change before sending the error, as when a response is lost.
        `delay` sleeps before the call is processed, or, with `after_commit`, between storing
        and responding. `status` None only delays. `status` 0 or "drop" closes the connection
        without a response. httplib2 0.32 sends a request a second time when the connection
        closes before the status line, so a single drop is invisible to its callers. Use
        `times=2` to make the call fail. `times` None applies the fault to every matching call.
        """
        if status == "drop":
            status = DROP_CONNECTION
        if isinstance(status, str):
            raise ValueError(f"status must be an HTTP status, 0, 'drop' or None, not {status!r}")

        fault = Fault(
            method=method.upper() if method else None,
            path_contains=path_contains,
            status=status,
            reason=reason,
            message=message,
            times=times,
            after_commit=after_commit,
            delay=delay,
            retry_after=retry_after,
            calendar_id=calendar_id,
        )
        return self._faults.add(fault)

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._faults.clear()
