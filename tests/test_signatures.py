"""Tests for X-Webhook-Signature signing and verification."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from connector.signatures import (
    MalformedSignatureError,
    MissingSignatureError,
    NoSecretConfiguredError,
    SignatureError,
    SignatureMismatchError,
    sign,
    verify,
)

SECRET = "whsec_test_secret"
BODY = b'{"event":"booking.created","createdAt":"2026-03-16T14:05:00Z","payload":{"id":"bkg_xyz789"}}'

# Computed once with: printf '%s' BODY | openssl dgst -sha256 -hmac SECRET
BODY_SIGNATURE_OPENSSL = "e509578dc35ad225433accd0cc61d09f065b39ed8001abf90ca85599ce006721"

# Computed once with: printf '%s' 'café ☕ 🎉' | openssl dgst -sha256 -hmac SECRET (UTF-8 locale)
EMOJI_TEXT = "café ☕ 🎉"
EMOJI_SIGNATURE_OPENSSL = "6259d5c34ca9aa7533a9c93cc7b7e2c0c862cf021809f5a359ca5e2843683bb5"

# Computed once with: printf '%s' BODY | openssl dgst -sha256 -hmac 'clé-🔑-rotation' (UTF-8 locale)
NON_ASCII_SECRET = "clé-🔑-rotation"
NON_ASCII_SECRET_SIGNATURE_OPENSSL = "b82f7e3bbbd3f94c9ebebfab2a78706d90e38d6d09642f8b2ee9c09a26c741d7"


def reference_signature(body: bytes, secret: str) -> str:
    """Compute the signature from the contract, without the module under test."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def test_sign_matches_hmac_reference() -> None:
    assert sign(BODY, SECRET) == reference_signature(BODY, SECRET)


def test_sign_matches_openssl_literal() -> None:
    assert sign(BODY, SECRET) == BODY_SIGNATURE_OPENSSL


def test_sign_emoji_body_matches_openssl() -> None:
    assert sign(EMOJI_TEXT.encode("utf-8"), SECRET) == EMOJI_SIGNATURE_OPENSSL


def test_sign_non_ascii_secret_matches_openssl() -> None:
    assert sign(BODY, NON_ASCII_SECRET) == NON_ASCII_SECRET_SIGNATURE_OPENSSL


def test_sign_output_is_bare_lowercase_hex() -> None:
    signature = sign(BODY, SECRET)

    assert len(signature) == 64
    assert signature == signature.lower()
    assert set(signature) <= set("0123456789abcdef")


def test_verify_openssl_signature_passes() -> None:
    assert verify(BODY, BODY_SIGNATURE_OPENSSL, [SECRET]) is None


def test_verify_reference_signature_passes() -> None:
    assert verify(BODY, reference_signature(BODY, SECRET), [SECRET]) is None


def test_verify_empty_body_passes() -> None:
    assert verify(b"", reference_signature(b"", SECRET), [SECRET]) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"payload":{"invitee":{"name":"Zoë Müller"}}}',
        '{"payload":{"location":"Café Zürich, Straße 5"}}',
        '{"payload":{"invitee":{"name":"山田太郎"}}}',
        '{"payload":{"title":"Kickoff 🎉🚀"}}',
        '{"payload":{"title":"👩‍👩‍👧 family emoji with joiners"}}',
        EMOJI_TEXT,
    ],
    ids=["latin-diaeresis", "latin-eszett", "cjk", "emoji", "emoji-zwj", "emoji-text"],
)
def test_verify_non_ascii_body_passes(text: str) -> None:
    body = text.encode("utf-8")

    assert verify(body, reference_signature(body, SECRET), [SECRET]) is None


def test_verify_emoji_body_openssl_passes() -> None:
    assert verify(EMOJI_TEXT.encode("utf-8"), EMOJI_SIGNATURE_OPENSSL, [SECRET]) is None


def test_verify_non_ascii_secret_passes() -> None:
    assert verify(BODY, NON_ASCII_SECRET_SIGNATURE_OPENSSL, [NON_ASCII_SECRET]) is None


def test_verify_secret_utf8_not_latin1() -> None:
    secret = "clé"
    latin1_signature = hmac.new(secret.encode("latin-1"), BODY, hashlib.sha256).hexdigest()

    with pytest.raises(SignatureMismatchError):
        verify(BODY, latin1_signature, [secret])


def test_verify_reserialized_whitespace_fails() -> None:
    signature = sign(BODY, SECRET)
    reserialized = json.dumps(json.loads(BODY), indent=2).encode("utf-8")

    assert reserialized != BODY
    with pytest.raises(SignatureMismatchError):
        verify(reserialized, signature, [SECRET])


def test_verify_reserialized_key_order_fails() -> None:
    signature = sign(BODY, SECRET)
    reserialized = json.dumps(json.loads(BODY), sort_keys=True, separators=(",", ":")).encode("utf-8")

    assert json.loads(reserialized) == json.loads(BODY)
    assert reserialized != BODY
    with pytest.raises(SignatureMismatchError):
        verify(reserialized, signature, [SECRET])


def test_verify_escaped_unicode_fails() -> None:
    raw = '{"payload":{"location":"Café"}}'.encode("utf-8")
    escaped = b'{"payload":{"location":"Caf\\u00e9"}}'
    signature = sign(raw, SECRET)

    assert json.loads(escaped) == json.loads(raw)
    with pytest.raises(SignatureMismatchError):
        verify(escaped, signature, [SECRET])


def test_verify_raw_unicode_fails_reverse() -> None:
    raw = '{"payload":{"location":"Café"}}'.encode("utf-8")
    escaped = b'{"payload":{"location":"Caf\\u00e9"}}'
    signature = sign(escaped, SECRET)

    with pytest.raises(SignatureMismatchError):
        verify(raw, signature, [SECRET])


def test_verify_trailing_newline_fails() -> None:
    signature = sign(BODY, SECRET)

    with pytest.raises(SignatureMismatchError):
        verify(BODY + b"\n", signature, [SECRET])


def test_verify_truncated_body_fails() -> None:
    signature = sign(BODY, SECRET)

    with pytest.raises(SignatureMismatchError):
        verify(BODY[:-1], signature, [SECRET])


@pytest.mark.parametrize("position", range(len(BODY)))
def test_verify_one_changed_byte_fails(position: int) -> None:
    signature = sign(BODY, SECRET)
    changed = bytearray(BODY)
    changed[position] ^= 0x01

    with pytest.raises(SignatureMismatchError):
        verify(bytes(changed), signature, [SECRET])


@pytest.mark.parametrize("position", [0, 31, 63])
def test_verify_one_changed_hex_digit_fails(position: int) -> None:
    signature = list(sign(BODY, SECRET))
    signature[position] = "0" if signature[position] != "0" else "1"

    with pytest.raises(SignatureMismatchError):
        verify(BODY, "".join(signature), [SECRET])


def test_verify_wrong_secret_fails() -> None:
    signature = sign(BODY, "some_other_secret")

    with pytest.raises(SignatureMismatchError):
        verify(BODY, signature, [SECRET])


def test_verify_uppercase_hex_passes() -> None:
    # The module lower-cases the header before comparing, so uppercase hex is accepted even
    # though Proximity sends lowercase.
    signature = BODY_SIGNATURE_OPENSSL.upper()

    assert verify(BODY, signature, [SECRET]) is None


def test_verify_mixed_case_hex_passes() -> None:
    signature = BODY_SIGNATURE_OPENSSL[:32].upper() + BODY_SIGNATURE_OPENSSL[32:]

    assert verify(BODY, signature, [SECRET]) is None


def test_verify_surrounding_whitespace_passes() -> None:
    # The module strips whitespace around the header value before checking it.
    assert verify(BODY, f"  {BODY_SIGNATURE_OPENSSL}\t", [SECRET]) is None


@pytest.mark.parametrize("signature", [None, "", "   "], ids=["none", "empty", "blank"])
def test_verify_missing_signature_raises(signature: str | None) -> None:
    with pytest.raises(MissingSignatureError):
        verify(BODY, signature, [SECRET])


@pytest.mark.parametrize(
    "signature",
    [
        "sha256=" + BODY_SIGNATURE_OPENSSL,
        "SHA256=" + BODY_SIGNATURE_OPENSSL,
        BODY_SIGNATURE_OPENSSL[:-1],
        BODY_SIGNATURE_OPENSSL + "0",
        "z" * 64,
        BODY_SIGNATURE_OPENSSL[:63] + "g",
        "5QlXjcNa0iVDOszQzGHQnwZbOe2AAav5DKhVmc4AZyE=",
        BODY_SIGNATURE_OPENSSL[:32] + " " + BODY_SIGNATURE_OPENSSL[33:],
        "٠" * 64,
    ],
    ids=[
        "sha256-prefix",
        "uppercase-prefix",
        "63-chars",
        "65-chars",
        "non-hex-letters",
        "one-non-hex-char",
        "base64-of-digest",
        "inner-space",
        "arabic-indic-digits",
    ],
)
def test_verify_malformed_signature_raises(signature: str) -> None:
    with pytest.raises(MalformedSignatureError):
        verify(BODY, signature, [SECRET])


def test_verify_prefix_message_names_format() -> None:
    with pytest.raises(MalformedSignatureError) as caught:
        verify(BODY, "sha256=" + BODY_SIGNATURE_OPENSSL, [SECRET])

    assert "64-character hex" in str(caught.value)


def test_verify_empty_secret_list_raises() -> None:
    with pytest.raises(NoSecretConfiguredError):
        verify(BODY, BODY_SIGNATURE_OPENSSL, [])


def test_verify_only_empty_secrets_raises() -> None:
    with pytest.raises(NoSecretConfiguredError):
        verify(BODY, BODY_SIGNATURE_OPENSSL, ["", ""])


def test_verify_no_secret_checked_before_signature() -> None:
    # With no secret configured nothing can be trusted, so that error wins over a missing header.
    with pytest.raises(NoSecretConfiguredError):
        verify(BODY, None, [])


def test_verify_empty_secret_entry_ignored() -> None:
    assert verify(BODY, BODY_SIGNATURE_OPENSSL, ["", SECRET]) is None


def test_verify_rotation_second_secret_passes() -> None:
    signature = sign(BODY, "whsec_old_secret")

    assert verify(BODY, signature, [SECRET, "whsec_old_secret"]) is None


def test_verify_rotation_first_secret_passes() -> None:
    signature = sign(BODY, SECRET)

    assert verify(BODY, signature, [SECRET, "whsec_old_secret"]) is None


def test_verify_rotation_non_ascii_secret() -> None:
    assert verify(BODY, NON_ASCII_SECRET_SIGNATURE_OPENSSL, [SECRET, NON_ASCII_SECRET]) is None


def test_verify_rotation_no_secret_matches_raises() -> None:
    signature = sign(BODY, "whsec_retired_secret")

    with pytest.raises(SignatureMismatchError):
        verify(BODY, signature, [SECRET, "whsec_old_secret"])


def test_verify_accepts_secret_generator() -> None:
    secrets = (secret for secret in ["whsec_old_secret", SECRET])

    assert verify(BODY, BODY_SIGNATURE_OPENSSL, secrets) is None


@pytest.mark.parametrize(
    "error_type",
    [MissingSignatureError, MalformedSignatureError, SignatureMismatchError, NoSecretConfiguredError],
)
def test_signature_errors_share_base(error_type: type[Exception]) -> None:
    assert issubclass(error_type, SignatureError)
