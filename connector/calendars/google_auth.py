"""Google credentials for the calendar backend: loading the file and authorizing each user.

Two kinds of credentials file are accepted:

- a service-account key (`"type": "service_account"`) with domain-wide delegation. Calls
  for an acting user use `with_subject(user)`, so Google checks that user's calendar
  access. Tokens come from the key's `token_uri`.
- an authorized-user file (`"type": "authorized_user"`) holding a refresh token from an
  OAuth consent. Every call runs as the user who consented, whatever the acting user.

Credentials are never looked up from the environment (`google.auth.default()` is not
called), so nothing here contacts a metadata server.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import google.auth.credentials
import google.auth.exceptions
import google.oauth2.credentials
from google.oauth2 import service_account

from connector.calendars.base import CalendarError, PermanentCalendarError, TransientCalendarError
from connector.calendars.google_transport import AuthRequest, describe_url

logger = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/calendar.events"

SERVICE_ACCOUNT_TYPE = "service_account"
AUTHORIZED_USER_TYPE = "authorized_user"


class CredentialsFileError(ValueError):
    """The Google credentials file is missing, unreadable or not a usable credentials file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"Google credentials file {path}: {problem}")
        self.path = path
        self.problem = problem


class GoogleCredentials:
    """The credentials loaded from one file, and a cached authorizer per acting user.

    Thread-safe: authorizers are created under a lock and each refreshes its token
    under its own lock.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        base: google.auth.credentials.Credentials,
        *,
        principal: str,
        client_id: str | None,
        token_uri: str,
    ) -> None:
        self.path = path
        self.kind = kind
        self.principal = principal
        self.client_id = client_id
        self.token_uri = token_uri
        self._base = base
        self._lock = threading.Lock()
        self._authorizers: dict[str | None, UserAuthorizer] = {}

    @property
    def is_service_account(self) -> bool:
        return self.kind == SERVICE_ACCOUNT_TYPE

    def credentials_for(self, user: str | None) -> google.auth.credentials.Credentials:
        """Return fresh, unrefreshed credentials that act as `user`.

        A service account delegates to `user`, or acts as itself when `user` is None. An
        authorized user always acts as the account that consented.
        """
        if self.is_service_account and user is not None:
            return self._base.with_subject(user)
        return self._base

    def authorizer(self, user: str | None, request: AuthRequest) -> UserAuthorizer:
        """Return the cached authorizer of `user`, creating it on first use."""
        key = user if self.is_service_account else None
        with self._lock:
            authorizer = self._authorizers.get(key)
            if authorizer is None:
                authorizer = UserAuthorizer(self, key, self.credentials_for(key), request)
                self._authorizers[key] = authorizer
            return authorizer


class UserAuthorizer:
    """Adds one acting user's bearer token to requests, and refreshes it when needed.

    Token errors become calendar errors here. A transport failure or a retryable token
    endpoint response is transient, and everything else is permanent with a hint for the
    operator.
    """

    def __init__(
        self,
        source: GoogleCredentials,
        user: str | None,
        credentials: google.auth.credentials.Credentials,
        request: AuthRequest,
    ) -> None:
        self._source = source
        self._user = user
        self._credentials = credentials
        self._request = request
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        """The account that the calls run as, for messages."""
        if self._source.is_service_account and self._user is not None:
            return f"{self._user} (delegated by {self._source.principal})"
        return self._source.principal

    def authorize(self, method: str, url: str, headers: dict[str, str]) -> str | None:
        """Add the authorization header, refreshing an expired or missing token first.

        This calls `refresh()` and `apply()` rather than `before_request()`, because in
        google-auth 2.63 `before_request()` may also start a regional access boundary
        lookup against a Google host when an environment variable enables it.
        """
        with self._lock:
            if not self._credentials.valid:
                self._refresh()
            self._credentials.apply(headers)
            return self._credentials.token

    def refresh_rejected(self, rejected_token: str | None) -> None:
        """Refresh after a 401, unless another thread already replaced the rejected token."""
        with self._lock:
            if self._credentials.token == rejected_token:
                self._refresh()

    def _refresh(self) -> None:
        try:
            self._credentials.refresh(self._request)
        except google.auth.exceptions.TransportError as error:
            raise TransientCalendarError(
                f"token request for {self.identity} to {describe_url(self._source.token_uri)} "
                f"failed: {error}"
            ) from error
        except google.auth.exceptions.RefreshError as error:
            raise self._refresh_failure(error) from error

        logger.debug("refreshed the access token for %s", self.identity)

    def _refresh_failure(self, error: google.auth.exceptions.RefreshError) -> CalendarError:
        """Turn a token endpoint rejection into an error that includes the operator's next step."""
        code, detail = _refresh_error_parts(error)
        prefix = f"token request for {self.identity} was rejected ({detail})"

        if error.retryable:
            return TransientCalendarError(f"{prefix}, and the token endpoint may recover", reason=code)

        return PermanentCalendarError(f"{prefix}. {self._advice(code)}", reason=code)

    def _advice(self, code: str | None) -> str:
        """Return what the operator should check for the token error `code`."""
        path = self._source.path
        if self._source.is_service_account:
            if code in ("unauthorized_client", "invalid_scope", "access_denied"):
                return (
                    "Domain-wide delegation is missing: in the Google Workspace Admin console "
                    "(Security > API controls > Domain-wide delegation), authorize client ID "
                    f"{self._source.client_id} of service account {self._source.principal} "
                    f"for the scope {SCOPE}"
                )
            if code == "invalid_grant":
                return (
                    f"Check that {self._user or self._source.principal} is an active user of "
                    f"the Workspace domain, that the key in {path} is not deleted or disabled, "
                    "and that this machine's clock is correct"
                )
            return f"Check the service-account key in {path}"

        if code == "invalid_grant":
            return (
                f"The refresh token in {path} is expired or revoked: run the OAuth consent "
                "again and replace the file"
            )
        if code in ("invalid_client", "unauthorized_client"):
            return f"The OAuth client ID or secret in {path} is invalid or was deleted"
        return f"Check the authorized-user file {path}"


def _refresh_error_parts(error: google.auth.exceptions.RefreshError) -> tuple[str | None, str]:
    """Return the OAuth error code and the readable text of a RefreshError."""
    detail = str(error.args[0]) if error.args else str(error)

    code = None
    if len(error.args) > 1 and isinstance(error.args[1], dict):
        code = error.args[1].get("error")
    if code is None and ":" in detail:
        code = detail.split(":", 1)[0].strip() or None
    return code, detail


def load_credentials(path: Path) -> GoogleCredentials:
    """Load a service-account key or an authorized-user file, scoped to Calendar events.

    Raises CredentialsFileError, naming the file, when it is missing, unreadable, not
    JSON, of another type, or missing fields. Messages never include file contents.
    """
    path = Path(path)
    info = _read_json_object(path)

    kind = info.get("type")
    if kind == SERVICE_ACCOUNT_TYPE:
        return _load_service_account(path, info)
    if kind == AUTHORIZED_USER_TYPE:
        return _load_authorized_user(path, info)

    raise CredentialsFileError(
        path,
        f'has "type": {json.dumps(kind)}, but must be a service-account key '
        f'("type": "{SERVICE_ACCOUNT_TYPE}") or an authorized-user file '
        f'("type": "{AUTHORIZED_USER_TYPE}")',
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsFileError(path, "does not exist") from None
    except IsADirectoryError:
        raise CredentialsFileError(path, "is a directory, not a file") from None
    except PermissionError:
        raise CredentialsFileError(path, "cannot be read: permission denied") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialsFileError(path, f"cannot be read: {type(error).__name__}") from None

    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise CredentialsFileError(
            path, f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None

    if not isinstance(info, dict):
        raise CredentialsFileError(path, "must contain a JSON object")
    return info


def _load_service_account(path: Path, info: dict[str, Any]) -> GoogleCredentials:
    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    except (ValueError, TypeError) as error:
        # google-auth names the missing fields. For a malformed key it raises from the
        # cryptography parser, whose message does not quote the key.
        raise CredentialsFileError(path, f"is not a usable service-account key: {error}") from None

    return GoogleCredentials(
        path,
        SERVICE_ACCOUNT_TYPE,
        credentials,
        principal=info["client_email"],
        client_id=info.get("client_id"),
        token_uri=info["token_uri"],
    )


def _load_authorized_user(path: Path, info: dict[str, Any]) -> GoogleCredentials:
    try:
        credentials = google.oauth2.credentials.Credentials.from_authorized_user_info(
            info, scopes=[SCOPE]
        )
    except (ValueError, TypeError) as error:
        raise CredentialsFileError(path, f"is not a usable authorized-user file: {error}") from None

    # from_authorized_user_info always sets Google's token endpoint (google-auth 2.63),
    # so the file's own token_uri is applied afterwards.
    token_uri = info.get("token_uri")
    if token_uri:
        credentials = credentials.with_token_uri(token_uri)

    return GoogleCredentials(
        path,
        AUTHORIZED_USER_TYPE,
        credentials,
        principal=info.get("account") or f"the user who authorized client {info['client_id']}",
        client_id=info.get("client_id"),
        token_uri=credentials.token_uri,
    )
