"""AES-GCM sealing of block values for persistent tiers (``cryptography``).

A sealed value is ``nonce (12 bytes) | ciphertext+tag``, with the block's address (its shard
digest, scope, block key) as associated data, so a value copied under another address does not
open: the shard digest (``layout.shard_digest``) names the compat key, the KV layout and the
TP/PP rank, so one rank's sealed block never opens as another rank's.
``open_into`` opens a value into the caller's buffer (``AESGCM.decrypt_into``: a restore reuses
one buffer for all its blocks instead of a fresh one per block), with the same nonce, associated
data and tag check as ``open``; when the tag does not verify it answers None and the buffer's
bytes are not plaintext to use (the caller refuses the block: the engine recomputes it).
``opening`` opens a value piece by piece (``GcmOpening``: AES-GCM's streaming decryptor, same
nonce, associated data and tag), so that a restore decrypts each tensor of a block straight into
its place in the engine's cache, one pass over the bytes; the tag is checked once every byte has
been decrypted (``verify``), and the caller wipes what it wrote when it does not verify.
``ScopedSealer`` uses one data key per isolation scope from a ``Keyring``: destroying a scope's
key makes every sealed copy of it unreadable (crypto-erasure), wherever the copies are.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvstore.tier import BlockAddress, Keyring


class AesGcmSealer:
    def __init__(self, data_key: bytes) -> None:
        if len(data_key) not in (16, 24, 32):
            raise ValueError("an AES-GCM data key is 16, 24 or 32 bytes")
        self._aead = AESGCM(data_key)
        self._cipher = algorithms.AES(data_key)

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

    def opening(self, sealed: bytes | memoryview, address: BlockAddress) -> GcmOpening | None:
        return GcmOpening.start(self._cipher, sealed, address)


class ScopedSealer:
    """Seals each block with its scope's data key (created on first store)."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._aeads: dict[bytes, AESGCM] = {}
        self._ciphers: dict[bytes, algorithms.AES] = {}

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

    def opening(self, sealed: bytes | memoryview, address: BlockAddress) -> GcmOpening | None:
        data_key = self._keyring.data_key(address.scope, create=False)
        if data_key is None:
            return None
        cipher = self._ciphers.get(data_key)
        if cipher is None:
            if len(self._ciphers) > 1024:
                self._ciphers.clear()
            cipher = self._ciphers[data_key] = algorithms.AES(data_key)
        return GcmOpening.start(cipher, sealed, address)

    def _aead(self, data_key: bytes) -> AESGCM:
        aead = self._aeads.get(data_key)
        if aead is None:
            if len(self._aeads) > 1024:
                self._aeads.clear()
            aead = self._aeads[data_key] = AESGCM(data_key)
        return aead


class GcmOpening:
    """One sealed value opened piece by piece, in order: ``read_into(out)`` decrypts its next
    ``len(out)`` bytes into ``out``; ``verify()`` is True only when every byte was read and the
    tag verifies. Until then nothing read is to be trusted: a caller that wrote it somewhere
    wipes it there unless ``verify()`` (``codec.BlockSink.take_sealed``)."""

    def __init__(self, decryptor: Any, body: memoryview) -> None:
        self._decryptor = decryptor
        self._body = body  # the ciphertext, without nonce and tag
        self._read = 0
        self.size = len(body)  # the plaintext's bytes

    @classmethod
    def start(
        cls, cipher: algorithms.AES, sealed: bytes | memoryview, address: BlockAddress
    ) -> GcmOpening | None:
        """None when ``sealed`` is too short to be a sealed value."""
        if opened_size(sealed) < 0:
            return None
        view = memoryview(sealed)
        decryptor = Cipher(cipher, modes.GCM(bytes(view[:12]), bytes(view[-16:]))).decryptor()
        decryptor.authenticate_additional_data(_associated(address))
        return cls(decryptor, view[12:-16])

    @property
    def remaining(self) -> int:
        return self.size - self._read

    def read_into(self, out: Any) -> bool:
        """Decrypt the next ``len(out)`` bytes (``out``: a writable buffer) into ``out``; False,
        with nothing written, when fewer remain."""
        size = memoryview(out).nbytes
        if size > self.remaining:
            return False
        self._decryptor.update_into(self._body[self._read : self._read + size], out)
        self._read += size
        return True

    def verify(self) -> bool:
        if self.remaining:
            return False
        try:
            self._decryptor.finalize()
        except InvalidTag:
            return False
        return True


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
