"""AES-GCM sealing of block values for persistent tiers (``cryptography``).

A sealed value is ``nonce (12 bytes) | ciphertext+tag``, with the block's address (its shard
digest, scope, block key) as associated data, so a value copied under another address does not
open: the shard digest (``layout.shard_digest``) names the compat key, the KV layout and the
TP/PP rank, so one rank's sealed block never opens as another rank's.
``open_into`` opens a value into the caller's buffer (``AESGCM.decrypt_into``: a restore reuses
one buffer for all its blocks instead of a fresh one per block), with the same nonce, associated
data and tag check as ``open``; when the tag does not verify it answers None and the buffer's
bytes are not plaintext to use (the caller refuses the block: the engine recomputes it).
``ScopedSealer`` uses one data key per isolation scope from a ``Keyring``: destroying a scope's
key makes every sealed copy of it unreadable (crypto-erasure), wherever the copies are.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvstore.tier import BlockAddress, Keyring


class AesGcmSealer:
    def __init__(self, data_key: bytes) -> None:
        if len(data_key) not in (16, 24, 32):
            raise ValueError("an AES-GCM data key is 16, 24 or 32 bytes")
        self._aead = AESGCM(data_key)

    def seal(self, value: bytes, address: BlockAddress) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value, _associated(address))

    def open(self, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None:
        if len(sealed) < 12 + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _associated(address))
        except InvalidTag:
            return None

    def open_into(
        self, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
    ) -> memoryview | None:
        return _open_into(self._aead, sealed, address, out)


class ScopedSealer:
    """Seals each block with its scope's data key (created on first store)."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._aeads: dict[bytes, AESGCM] = {}

    def seal(self, value: bytes, address: BlockAddress) -> bytes | None:
        data_key = self._keyring.data_key(address.scope, create=True)
        if data_key is None:
            return None
        nonce = os.urandom(12)
        return nonce + self._aead(data_key).encrypt(nonce, value, _associated(address))

    def open(self, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None:
        data_key = self._keyring.data_key(address.scope, create=False)
        if data_key is None or len(sealed) < 12 + 16:
            return None
        try:  # a memoryview: no copy of the ciphertext before decrypting it
            return self._aead(data_key).decrypt(sealed[:12], memoryview(sealed)[12:], _associated(address))
        except InvalidTag:
            return None

    def open_into(
        self, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
    ) -> memoryview | None:
        data_key = self._keyring.data_key(address.scope, create=False)
        if data_key is None:
            return None
        return _open_into(self._aead(data_key), sealed, address, out)

    def _aead(self, data_key: bytes) -> AESGCM:
        aead = self._aeads.get(data_key)
        if aead is None:
            if len(self._aeads) > 1024:
                self._aeads.clear()
            aead = self._aeads[data_key] = AESGCM(data_key)
        return aead


def opened_size(sealed: bytes | memoryview) -> int:
    """The plaintext bytes of a sealed value (negative: too short to be one)."""
    return len(sealed) - 12 - 16


def _open_into(
    aead: AESGCM, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
) -> memoryview | None:
    """The plaintext of ``sealed`` as the start of ``out`` (at least ``opened_size`` bytes), or
    None when it does not open (too short, ``out`` too small, the tag does not verify); the
    bytes of ``out`` are then not to be used."""
    size = opened_size(sealed)
    if size < 0 or len(out) < size:
        return None
    view = out[:size]
    sealed = memoryview(sealed)
    try:
        aead.decrypt_into(sealed[:12], sealed[12:], _associated(address), view)
    except InvalidTag:
        return None
    return view


def _associated(address: BlockAddress) -> bytes:
    return f"{address.compat_digest}|{address.scope}|{address.key}".encode()
