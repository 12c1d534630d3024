"""Webhook signature verification.

Proximity signs each delivery with `X-Webhook-Signature`: the HMAC-SHA256 of the exact raw body,
keyed with the webhook secret encoded as UTF-8, written as bare lowercase hex. Several secrets may be
configured at once so that a secret can be rotated without rejecting deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

_SIGNATURE_FORMAT = re.compile(r"[0-9a-f]{64}")


class SignatureError(Exception):
    """The delivery's signature did not verify."""


class MissingSignatureError(SignatureError):
    """The X-Webhook-Signature header is absent or empty."""


class MalformedSignatureError(SignatureError):
    """The X-Webhook-Signature header is not 64 hexadecimal characters."""


class SignatureMismatchError(SignatureError):
    """The signature matches none of the configured secrets."""


class NoSecretConfiguredError(SignatureError):
    """No webhook secret is configured, so no delivery can be trusted."""


def sign(body: bytes, secret: str) -> str:
    """Return the signature Proximity sends for `body`: hex HMAC-SHA256 keyed with `secret`."""
    return hmac.digest(secret.encode("utf-8"), body, hashlib.sha256).hex()


def verify(body: bytes, signature: str | None, secrets: Iterable[str]) -> None:
    """Raise a SignatureError subclass unless `signature` signs `body` under one of `secrets`.

    Every secret is compared in constant time, and all of them are tried, so the time taken does
    not reveal which secret, if any, matched.
    """
    secret_list = [secret for secret in secrets if secret]
    if not secret_list:
        raise NoSecretConfiguredError("no webhook secret is configured (PROXIMITY_WEBHOOK_SECRET)")

    if not signature or not signature.strip():
        raise MissingSignatureError("missing X-Webhook-Signature header")

    candidate = signature.strip().lower()
    if _SIGNATURE_FORMAT.fullmatch(candidate) is None:
        raise MalformedSignatureError("X-Webhook-Signature is not a 64-character hex HMAC-SHA256")

    # The digests are compared as bytes, and `hmac.digest` computes each in one call into OpenSSL.
    expected = bytes.fromhex(candidate)
    matched = False
    for secret in secret_list:
        matched |= hmac.compare_digest(hmac.digest(secret.encode("utf-8"), body, hashlib.sha256), expected)
    if not matched:
        raise SignatureMismatchError("X-Webhook-Signature does not match the body under any configured secret")
