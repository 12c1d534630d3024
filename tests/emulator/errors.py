"""Error bodies in the shapes Google's Calendar API and OAuth token endpoint send."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"

# Reasons that Google reports in the "usageLimits" domain. Every other reason is "global".
USAGE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"})

DEFAULT_MESSAGES = {
    "backendError": "Backend Error",
    "internalError": "Internal Error",
    "rateLimitExceeded": "Rate Limit Exceeded",
    "userRateLimitExceeded": "User Rate Limit Exceeded",
    "quotaExceeded": "Calendar usage limits exceeded.",
    "forbidden": "Forbidden",
    "notFound": "Not Found",
    "deleted": "Resource has been deleted",
    "duplicate": "The requested identifier already exists.",
    "conditionNotMet": "Precondition Failed",
    "badRequest": "Bad Request",
}

AUTH_ERROR_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential."
)

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
}


class ApiError(Exception):
    """A Calendar API call that ends in an HTTP error status."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message or DEFAULT_MESSAGES.get(reason, reason)
        self.headers = dict(headers or {})
        super().__init__(f"{status} {reason}: {self.message}")

    def body(self) -> dict[str, Any]:
        """Build the JSON error document that the Calendar API sends."""
        domain = "usageLimits" if self.reason in USAGE_LIMIT_REASONS else "global"
        detail: dict[str, Any] = {"domain": domain, "reason": self.reason, "message": self.message}

        if self.reason == "authError":
            # Google names the failing header and words the item message differently.
            detail.update(
                message="Invalid Credentials", location="Authorization", locationType="header"
            )

        document: dict[str, Any] = {"errors": [detail], "code": self.status, "message": self.message}
        if self.status in STATUS_NAMES:
            document["status"] = STATUS_NAMES[self.status]
        return {"error": document}

    def response(self) -> Response:
        """Render the error as a Starlette response."""
        return json_response(self.body(), status=self.status, headers=self.headers)


class OAuthError(Exception):
    """A token request that the OAuth endpoint rejects."""

    def __init__(self, status: int, error: str, description: str) -> None:
        self.status = status
        self.error = error
        self.description = description
        super().__init__(f"{status} {error}: {description}")

    def response(self) -> Response:
        """Render the error as the token endpoint's JSON body."""
        return json_response({"error": self.error, "error_description": self.description}, status=self.status)


def json_response(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize `document` as the compact JSON response Google's endpoints send."""
    content = json.dumps(document, separators=(",", ":")).encode("utf-8")
    return Response(content=content, status_code=status, headers=headers, media_type=JSON_CONTENT_TYPE)
