"""Credential files in the formats that google-auth loads: service-account keys and authorized users."""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
CALENDAR_EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"
CALENDAR_SCOPES = frozenset({CALENDAR_SCOPE, CALENDAR_EVENTS_SCOPE})

# Google signs service-account keys with 2048-bit RSA.
RSA_KEY_SIZE = 2048


@dataclass
class ServiceAccount:
    """A registered service account: its public keys and its domain-wide delegation grant."""

    client_email: str
    client_id: str
    public_keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    delegation: bool = True
    # None lets delegated tokens carry any calendar scope.
    delegated_scopes: frozenset[str] | None = None


@dataclass
class AuthorizedUser:
    """An OAuth client with a user's refresh token, as `gcloud auth application-default login` writes."""

    client_id: str
    client_secret: str
    refresh_token: str
    user: str
    scopes: frozenset[str] = field(default_factory=lambda: CALENDAR_SCOPES)


def generate_service_account_key(
    client_email: str,
    client_id: str,
    token_uri: str,
) -> tuple[dict[str, Any], rsa.RSAPublicKey]:
    """Build a JSON key document with a new key id and return it with the public key to register.

    Every key uses the process's shared RSA key pair, because generating a 2048-bit key took
    30 to 190 ms per key with cryptography 50 on a 2-CPU container. Each key still
    has its own `private_key_id`, and the token endpoint checks a signature against the key
    registered under that id.
    """
    private_key = shared_private_key()
    private_pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")

    private_key_id = secrets.token_hex(20)
    project_id = project_id_of(client_email)
    cert_url_email = client_email.replace("@", "%40")

    document = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id,
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{cert_url_email}",
        "universe_domain": "googleapis.com",
    }
    return document, private_key.public_key()


@functools.lru_cache(maxsize=1)
def shared_private_key() -> rsa.RSAPrivateKey:
    """Generate the RSA key pair that all service-account keys of this process share."""
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)


def new_service_account_client_id() -> str:
    """Return a random 21-digit number, the form of Google's service-account client ids."""
    return str(10**20 + secrets.randbelow(9 * 10**20))


def project_id_of(client_email: str) -> str:
    """Return the project in a `NAME@PROJECT.iam.gserviceaccount.com` address, or a placeholder."""
    domain = client_email.partition("@")[2]
    if domain.endswith(".iam.gserviceaccount.com"):
        return domain.removesuffix(".iam.gserviceaccount.com")
    return "emulator-project"


def generate_authorized_user(user: str, token_uri: str) -> tuple[dict[str, Any], AuthorizedUser]:
    """Create an OAuth client and refresh token for `user` and return the file document and registration."""
    number = 10**11 + secrets.randbelow(9 * 10**11)
    client_id = f"{number}-{secrets.token_hex(16)}.apps.googleusercontent.com"

    registration = AuthorizedUser(
        client_id=client_id,
        client_secret=f"GOCSPX-{secrets.token_urlsafe(21)}",
        refresh_token=f"1//emulator-{secrets.token_urlsafe(32)}",
        user=user,
    )
    document = {
        "type": "authorized_user",
        "client_id": registration.client_id,
        "client_secret": registration.client_secret,
        "refresh_token": registration.refresh_token,
        "token_uri": token_uri,
        "account": user,
        "universe_domain": "googleapis.com",
    }
    return document, registration


def write_json_file(path: str | Path, document: dict[str, Any]) -> None:
    """Write a credential document that only its owner may read, because it contains a secret."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    target.chmod(0o600)
