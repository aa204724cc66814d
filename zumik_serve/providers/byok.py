"""Tenants' own provider keys (BYOK), sealed with AES-256-GCM before they are stored.

Rule kept here: a sealed key opens only for the (tenant, route) it was sealed for, since both are
the cipher's associated data; a sealed value copied under another tenant or route fails to open.
Nothing here prints a key: ``mask`` shows which key is set, ``repr`` shows no key material.

Sealed layout: ``version (1 byte) | nonce (12 bytes) | ciphertext + tag (16 bytes)``.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
SEAL_VERSION = b"\x01"
NONCE_BYTES = 12
_AAD_PREFIX = b"zumik-byok/1\0"


class SealedKeyError(ValueError):
    """A sealed value that does not open: another tenant's or route's, tampered, or sealed under
    another master key."""


class KeyVault:
    """Seals and opens provider API keys under one 32-byte master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the BYOK master key must be {MASTER_KEY_BYTES} bytes, got {len(master_key)}")
        self._aead = AESGCM(master_key)

    def __repr__(self) -> str:
        return "KeyVault(master_key=<redacted>)"

    def seal(self, tenant: str, route: str, api_key: str) -> bytes:
        if not api_key:
            raise ValueError("an empty API key cannot be stored")
        nonce = secrets.token_bytes(NONCE_BYTES)
        return SEAL_VERSION + nonce + self._aead.encrypt(nonce, api_key.encode(), _aad(tenant, route))

    def open(self, tenant: str, route: str, sealed: bytes) -> str:
        """The plaintext key; ``SealedKeyError`` when ``sealed`` was not sealed for exactly this
        tenant and route under this master key."""
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != SEAL_VERSION:
            raise SealedKeyError(f"the stored key for route {route!r} is not a sealed value this vault reads")
        nonce, ciphertext = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _aad(tenant, route))
        except InvalidTag:
            raise SealedKeyError(
                f"the stored key for route {route!r} does not open for this tenant and route"
            ) from None
        return plaintext.decode()


def mask(api_key: str) -> str:
    """``sk-…abcd``: the key's type prefix and its last 4 characters, enough to tell which key is
    set. Keys shorter than 16 characters show no tail (4 of so few would reveal too much)."""
    head, dash, _ = api_key.partition("-")
    prefix = head + dash if dash and len(head) <= 6 else ""
    tail = api_key[-4:] if len(api_key) >= 16 else ""
    return f"{prefix}…{tail}"


def _aad(tenant: str, route: str) -> bytes:
    # Length-free separators are safe: neither a tenant id nor a route may contain NUL.
    if "\0" in tenant or "\0" in route:
        raise ValueError("tenant and route must not contain NUL")
    return _AAD_PREFIX + tenant.encode() + b"\0" + route.encode()
