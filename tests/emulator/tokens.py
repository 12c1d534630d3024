"""The OAuth 2.0 token endpoint: JWT-bearer grants for service accounts and refresh-token grants."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.emulator.errors import OAuthError
from tests.emulator.keys import (
    CALENDAR_SCOPES,
    AuthorizedUser,
    ServiceAccount,
    new_service_account_client_id,
)

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REFRESH_TOKEN_GRANT = "refresh_token"

# google-auth 2.63 signs the first URL as audience, whatever token_uri the key file names.
# The other two are older Google token URLs.
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {
        "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/oauth2/v4/token",
        "https://accounts.google.com/o/oauth2/token",
    }
)

ACCESS_TOKEN_LIFETIME = 3600

# Google rejects assertions that live longer than an hour. The slack allows for clock skew.
MAX_ASSERTION_LIFETIME = 3600 + 300
CLOCK_SKEW = 300

UNAUTHORIZED_CLIENT_DESCRIPTION = (
    "Client is unauthorized to retrieve access tokens using this method, "
    "or client not authorized for any of the scopes requested."
)


@dataclass(frozen=True)
class AccessGrant:
    """The user, client and scopes of an issued access token."""

    user: str
    client_id: str
    scopes: frozenset[str]
    expires_at: float


@dataclass(frozen=True)
class TokenRequest:
    """One call to the token endpoint, as the emulator recorded it."""

    grant_type: str
    subject: str | None
    status: int
    client: str | None = None
    error: str | None = None


class TokenIssuer:
    """Verifies token requests against registered credentials and keeps the issued access tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts_by_email: dict[str, ServiceAccount] = {}
        self._accounts_by_client_id: dict[str, ServiceAccount] = {}
        self._authorized_users: dict[str, AuthorizedUser] = {}
        self._grants: dict[str, AccessGrant] = {}
        self._requests: list[TokenRequest] = []
        # The emulator's own token URL, which assertions may name as their audience.
        self.own_audiences: frozenset[str] = frozenset()

    def service_account(self, client_email: str) -> ServiceAccount:
        """Return the account registered for `client_email`, registering it with a new client id if needed."""
        with self._lock:
            account = self._accounts_by_email.get(client_email)
            if account is None:
                account = ServiceAccount(client_email, new_service_account_client_id())
                self._accounts_by_email[client_email] = account
                self._accounts_by_client_id[account.client_id] = account
            return account

    def add_service_account_key(
        self,
        client_email: str,
        private_key_id: str,
        public_key: rsa.RSAPublicKey,
        delegation: bool,
    ) -> ServiceAccount:
        """Accept assertions signed by a new key of the account, and set the account's delegation."""
        account = self.service_account(client_email)
        with self._lock:
            account.public_keys[private_key_id] = public_key
            account.delegation = delegation
            account.delegated_scopes = None
        return account

    def register_authorized_user(self, registration: AuthorizedUser) -> None:
        """Accept refresh-token grants for the registration's refresh token."""
        with self._lock:
            self._authorized_users[registration.refresh_token] = registration

    def set_delegation(self, client: str, allowed: bool, scopes: Iterable[str] | str | None = None) -> None:
        """Grant or withdraw domain-wide delegation for a service account, named by client id or email.

        `scopes` limits a grant to those scopes, like the Admin console's comma-separated list.
        None allows every calendar scope.
        """
        with self._lock:
            account = self._accounts_by_client_id.get(client) or self._accounts_by_email.get(client)
            if account is None:
                raise KeyError(f"no service account with client id or email {client!r} is registered")

            if isinstance(scopes, str):
                scopes = scopes.replace(",", " ").split()
            account.delegation = allowed
            account.delegated_scopes = None if scopes is None else frozenset(scopes)

    def authenticate(self, authorization: str | None) -> AccessGrant | None:
        """Return the grant behind an `Authorization: Bearer` header, or None when it is missing or expired."""
        if not authorization:
            return None

        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None

        grant = self._grants.get(token.strip())
        if grant is None or grant.expires_at <= time.time():
            return None
        return grant

    def revoke_access_tokens(self) -> None:
        """Forget every issued access token, so the next API call fails with 401 and clients refresh."""
        with self._lock:
            self._grants.clear()

    @property
    def requests(self) -> list[TokenRequest]:
        """The recorded token requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded token requests."""
        with self._lock:
            self._requests.clear()

    def exchange(self, form: dict[str, str]) -> dict[str, Any]:
        """Handle one token request body and return the token response, or raise `OAuthError`."""
        grant_type = form.get("grant_type", "")
        subject: str | None = None
        client: str | None = None

        try:
            if grant_type == JWT_BEARER_GRANT:
                account, subject, scopes = self._verify_assertion(form.get("assertion", ""))
                client = account.client_email
                user = subject or account.client_email
                document = self._issue(user, account.client_id, scopes)
            elif grant_type == REFRESH_TOKEN_GRANT:
                registration, scopes = self._verify_refresh(form)
                client = registration.client_id
                subject = registration.user
                document = self._issue(registration.user, registration.client_id, scopes)
                document["scope"] = " ".join(sorted(scopes))
            else:
                raise OAuthError(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        except OAuthError as error:
            self._record(TokenRequest(grant_type, subject, error.status, client, error.error))
            raise

        self._record(TokenRequest(grant_type, subject, 200, client))
        return document

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _issue(self, user: str, client_id: str, scopes: frozenset[str]) -> dict[str, Any]:
        token = f"ya29.emulator-{secrets.token_urlsafe(24)}"
        grant = AccessGrant(user, client_id, scopes, time.time() + ACCESS_TOKEN_LIFETIME)

        with self._lock:
            self._grants[token] = grant
        return {"access_token": token, "expires_in": ACCESS_TOKEN_LIFETIME, "token_type": "Bearer"}

    def _verify_assertion(self, assertion: str) -> tuple[ServiceAccount, str | None, frozenset[str]]:
        """Check a service account's signed JWT and return the account, subject and scopes."""
        header, claims, signing_input, signature = decode_jwt(assertion)

        issuer = claims.get("iss")
        with self._lock:
            account = self._accounts_by_email.get(issuer) if isinstance(issuer, str) else None
            if account is None or not account.public_keys:
                raise OAuthError(401, "invalid_client", "The OAuth client was not found.")

            # Without a key id, any of the account's keys may have signed the assertion.
            key_id = header.get("kid")
            if key_id is None:
                candidates = list(account.public_keys.values())
            else:
                candidates = [account.public_keys[key_id]] if key_id in account.public_keys else []

        if header.get("alg") != "RS256" or not any(
            signature_is_valid(key, signing_input, signature) for key in candidates
        ):
            raise OAuthError(400, "invalid_grant", "Invalid JWT Signature.")

        check_assertion_times(claims)

        audience = claims.get("aud")
        if audience not in GOOGLE_TOKEN_AUDIENCES and audience not in self.own_audiences:
            raise OAuthError(400, "invalid_grant", f"Invalid JWT: audience {audience!r} is not a token endpoint.")

        scopes = frozenset(str(claims.get("scope", "")).split())
        if not scopes:
            raise OAuthError(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        if not scopes & CALENDAR_SCOPES:
            raise OAuthError(
                400,
                "invalid_scope",
                f"The emulator issues tokens only for {sorted(CALENDAR_SCOPES)}, not for {sorted(scopes)}.",
            )

        subject = claims.get("sub")
        if subject is not None:
            delegated = account.delegated_scopes
            if not account.delegation or (delegated is not None and not scopes <= delegated):
                raise OAuthError(401, "unauthorized_client", UNAUTHORIZED_CLIENT_DESCRIPTION)

        return account, subject, scopes

    def _verify_refresh(self, form: dict[str, str]) -> tuple[AuthorizedUser, frozenset[str]]:
        """Check a refresh-token grant and return the registration and the granted scopes."""
        with self._lock:
            registration = self._authorized_users.get(form.get("refresh_token", ""))
            known_client = any(
                entry.client_id == form.get("client_id") for entry in self._authorized_users.values()
            )

        if registration is None:
            if not known_client:
                raise OAuthError(401, "invalid_client", "The OAuth client was not found.")
            raise OAuthError(400, "invalid_grant", "Token has been expired or revoked.")

        if form.get("client_id") != registration.client_id or form.get("client_secret") != registration.client_secret:
            raise OAuthError(401, "invalid_client", "Unauthorized")

        requested = frozenset(form.get("scope", "").split())
        if requested and not requested <= registration.scopes:
            raise OAuthError(400, "invalid_scope", "Bad Request")
        return registration, requested or registration.scopes


def decode_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWT into header, claims, signed bytes and signature, or raise `OAuthError`."""
    parts = assertion.split(".")
    if len(parts) != 3:
        raise OAuthError(400, "invalid_grant", "Invalid JWT: the assertion is not a compact JWS.")

    try:
        header = json.loads(base64url_decode(parts[0]))
        claims = json.loads(base64url_decode(parts[1]))
        signature = base64url_decode(parts[2])
    except (ValueError, binascii.Error):
        raise OAuthError(400, "invalid_grant", "Invalid JWT: the assertion is not valid base64url JSON.") from None

    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise OAuthError(400, "invalid_grant", "Invalid JWT: the header and claims must be JSON objects.")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def signature_is_valid(public_key: rsa.RSAPublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Check an RS256 signature."""
    try:
        public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def base64url_decode(text: str) -> bytes:
    """Decode unpadded base64url, as JWTs carry it."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_assertion_times(claims: dict[str, Any]) -> None:
    """Reject an assertion that has expired, is not yet valid, or lives longer than Google allows."""
    now = time.time()
    issued_at = claims.get("iat")
    expires_at = claims.get("exp")

    if not isinstance(issued_at, (int, float)) or not isinstance(expires_at, (int, float)):
        raise OAuthError(400, "invalid_grant", "Invalid JWT: the iat and exp claims are required.")

    if expires_at <= now or issued_at > now + CLOCK_SKEW or expires_at - issued_at > MAX_ASSERTION_LIFETIME:
        raise OAuthError(
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
            "Check your iat and exp values in the JWT claim.",
        )
