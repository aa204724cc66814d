"""AES-GCM sealing of block values for persistent tiers (``cryptography``).

A sealed value is ``nonce (12 bytes) | ciphertext+tag``, with the block's address as associated
data, so a value copied under another address does not open. One data key per isolation scope:
destroying that key makes every sealed copy of the scope unreadable (crypto-erasure).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvstore.tier import BlockAddress


class AesGcmSealer:
    def __init__(self, data_key: bytes) -> None:
        if len(data_key) not in (16, 24, 32):
            raise ValueError("an AES-GCM data key is 16, 24 or 32 bytes")
        self._aead = AESGCM(data_key)

    def seal(self, value: bytes, address: BlockAddress) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value, _associated(address))

    def open(self, sealed: bytes, address: BlockAddress) -> bytes | None:
        if len(sealed) < 12 + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _associated(address))
        except InvalidTag:
            return None


def _associated(address: BlockAddress) -> bytes:
    return f"{address.compat_digest}|{address.key}".encode()
